"""GPU metrics from NVML, exported by the builtin runtime in its own process: the server container is the one the
device plugin gives the GPUs to, so it is the one where NVML sees them (the monitoring sidecar requests none).
Engines that are not ours (vLLM, llama.cpp, custom) get GPU metrics from NVIDIA's dcgm-exporter (README)."""

from __future__ import annotations

import logging

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

# Per GPU, labelled model_name, gpu (NVML's index in this container) and uuid.
GPU_METRICS = {
    "util": ("model_gpu_utilization_ratio", "GPU busy fraction over NVML's last sample period"),
    "used": ("model_gpu_memory_used_bytes", "GPU memory used, by every process on the GPU"),
    "total": ("model_gpu_memory_total_bytes", "GPU memory"),
    "temp": ("model_gpu_temperature_celsius", "GPU temperature"),
    "power": ("model_gpu_power_watts", "GPU power draw"),
}


class NvmlCollector:
    """Reads NVML at each scrape. Without NVML (no library, no driver, no GPU visible) it exports nothing and says
    so once in the log; a reading one GPU does not support (power on some boards) is left out, not faked."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as error:     # no library, no driver or no device: all mean no GPU metrics here
            log.warning("no GPU metrics: NVML is not usable in this container (%s: %s)", type(error).__name__,
                        error)
            return
        self.nvml = pynvml
        log.info("GPU metrics: NVML sees %d GPU(s)", count)

    def readings(self, handle) -> dict:
        nv = self.nvml
        reads = {
            "util": lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100,
            "used": lambda: nv.nvmlDeviceGetMemoryInfo(handle).used,
            "total": lambda: nv.nvmlDeviceGetMemoryInfo(handle).total,
            "temp": lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU),
            "power": lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000,
        }
        values = {}
        for key, read in reads.items():
            try:
                values[key] = read()
            except nv.NVMLError:
                pass
        return values

    def collect(self):
        if self.nvml is None:
            return
        nv = self.nvml
        families = {key: GaugeMetricFamily(name, help_text, labels=["model_name", "gpu", "uuid"])
                    for key, (name, help_text) in GPU_METRICS.items()}
        try:
            for index in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                uuid = nv.nvmlDeviceGetUUID(handle)
                labels = [self.model_name, str(index), uuid.decode() if isinstance(uuid, bytes) else uuid]
                for key, value in self.readings(handle).items():
                    families[key].add_metric(labels, value)
        except nv.NVMLError as error:      # a GPU lost mid-scrape: what was read is still exported
            log.warning("GPU metrics: NVML failed: %s", error)
        yield from (family for family in families.values() if family.samples)
