"""Double of comfy.model_patcher.ModelPatcher (holds the module and its devices)."""


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.size = size

    def model_size(self):  # as ComfyUI's: the given size, else what state_dict() holds
        if self.size > 0:
            return self.size
        return sum(t.nelement() * t.element_size() for t in self.model.state_dict().values())
