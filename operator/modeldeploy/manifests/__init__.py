"""Pure builders: a ModelDeployment's spec (and the operator's configuration) in, Kubernetes manifests out.
The operator and `modeldeploy render` use the same functions."""
