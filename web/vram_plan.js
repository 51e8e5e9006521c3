// Shows the LiveAvatar VRAM Plan node's verdict on the node itself.
// ComfyUI's frontend displays a node's `ui.text` only for core 'Preview Any' (its extension
// Comfy.PreviewAny); every other node's text output is dropped. This does the same for our node:
// a read-only multiline widget filled from the executed message's `text`.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE = "LiveAvatarVRAMPlan";
const WIDGET = "verdict";

app.registerExtension({
  name: "LiveAvatar.VRAMPlanVerdict",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const widget = ComfyWidgets.STRING(this, WIDGET, ["STRING", { multiline: true }], app).widget;
      widget.element.readOnly = true;
      widget.element.placeholder = "the plan and its verdict appear here when the node runs";
      // not an input: keep it out of widgets_values (serialize) and out of the queued prompt (options.serialize);
      // a prompt carrying last run's text would change the node's cache key and re-run it on every queue
      widget.serialize = false;
      widget.options.serialize = false;
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === WIDGET);
      const text = message?.text;
      if (widget && text) widget.value = Array.isArray(text) ? text.join("\n") : String(text);
    };
  },
});
