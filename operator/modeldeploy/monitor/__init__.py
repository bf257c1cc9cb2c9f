"""`modeldeploy monitor`: the sidecar of every serving pod, one Prometheus endpoint per pod."""
