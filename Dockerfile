# modeldeploy images. Base images and wheel sources are build arguments, so the same file builds here, offline,
# from a locally made base (hack/build-images.sh: Debian bookworm by debootstrap, wheels prepared on the host) and
# elsewhere from a registry's python base image.
#
#   operator: `modeldeploy` for the operator, the pull Jobs and the monitoring sidecar - no torch.
#   (The runtime targets for CPU, CUDA and loong64 come with the images issue.)

ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS operator
# Wheels of modeldeploy and everything it needs, downloaded on the host (no network inside the build).
COPY wheels /wheels
RUN python3 -m venv /opt/modeldeploy \
 && /opt/modeldeploy/bin/pip install --no-index --no-cache-dir --find-links /wheels "modeldeploy[gpu]" \
 && rm -rf /wheels
ENV PATH=/opt/modeldeploy/bin:$PATH PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
USER 65532:65532
ENTRYPOINT ["modeldeploy"]
