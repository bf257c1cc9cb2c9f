"""`modeldeploy pull`: weights from Hugging Face, Gitee AI or a mirror into a shared Hugging Face cache."""
