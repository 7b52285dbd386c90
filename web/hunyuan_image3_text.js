// HunyuanImage-3 nodes: show the text a node returns ({"ui": {"text": [...]}}) on the node itself, in a
// read-only multiline text box below its widgets, the way core nodes show text on the canvas. Generate
// shows the size it rendered, its timings, which GPU mode ran and the model's own text; the unload nodes
// their report. The box is never part of the queued prompt.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES = ["HunyuanImage3Generate", "HunyuanImage3SoftUnload", "HunyuanImage3ForceUnload"];
const WIDGET = "hunyuan_text";

function textWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (widget) return widget;
  widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
  widget.serialize = false; // not saved among the node's widget values
  widget.options = { ...(widget.options ?? {}), serialize: false }; // not sent with the prompt
  const el = widget.inputEl ?? widget.element;
  if (el) {
    el.readOnly = true;
    el.style.opacity = "0.8";
    el.placeholder = "";
  }
  return widget;
}

function showText(node, lines) {
  const widget = textWidget(node);
  widget.value = (Array.isArray(lines) ? lines : [lines]).map(String).join("\n");
  const [w, h] = node.computeSize();
  node.setSize([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "HunyuanImage3.NodeText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.includes(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      if (output?.text !== undefined) showText(this, output.text);
    };
  },
});
