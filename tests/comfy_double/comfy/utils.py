"""Double of comfy.utils: a ProgressBar that records its updates."""
updates = []  # (value, total, preview)


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current = total, 0

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        updates.append((self.current, self.total, preview))

    def update(self, value):
        self.update_absolute(self.current + value)
