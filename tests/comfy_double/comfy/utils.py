"""Double of comfy.utils: a ProgressBar that records its updates and calls the global hook, as ComfyUI's does.

ComfyUI's server installs that hook (``main.py: hijack_progress``) and it raises the interrupt when Cancel was
pressed, so a node's progress update is one of the places an interrupt arrives; the double installs the same.
"""
import comfy.model_management

updates = []  # (value, total, preview)


def server_hook(value, total, preview, prompt_id=None, node_id=None):
    comfy.model_management.throw_exception_if_processing_interrupted()


PROGRESS_BAR_HOOK = server_hook


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current = total, 0
        self.hook, self.node_id = PROGRESS_BAR_HOOK, node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        updates.append((self.current, self.total, preview))
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)
