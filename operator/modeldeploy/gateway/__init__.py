"""`modeldeploy gateway`: one OpenAI endpoint for every ModelDeployment, routing on the request's `model` field to
that model's ready pods, holding requests while a model scales up from zero, and deciding replicas from load."""
