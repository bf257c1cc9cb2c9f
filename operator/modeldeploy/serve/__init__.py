"""`modeldeploy serve`: the torch/transformers model server that runs in the serving pods."""
