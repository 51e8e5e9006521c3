"""Double of comfy.model_management: CPU device, interrupt flag, a record of loads and frees."""
import torch


class InterruptProcessingException(Exception):
    pass


interrupt_processing = False
loaded = []  # patchers passed to load_models_gpu, in order
freed = []  # free_memory requests
emptied = 0  # soft_empty_cache calls


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def interrupt_current_processing(value=True):
    global interrupt_processing
    interrupt_processing = value


def processing_interrupted():
    return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    for m in models:
        if m not in loaded:
            loaded.append(m)
        m.model.to(m.load_device)


def free_memory(memory_required, device, keep_loaded=()):
    freed.append((memory_required, device))
    return []


def soft_empty_cache(force=False):
    global emptied
    emptied += 1
