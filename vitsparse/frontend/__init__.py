"""Frontend: load a ViT (timm name, torch module or ONNX file), import it into Relax, and read
its geometry (blocks, heads, MLP widths, tokens) from the Relax module."""

from vitsparse.frontend.importer import ImportedModel, import_model
from vitsparse.frontend.loading import load_torch_model
from vitsparse.frontend.vit_graph import BlockInfo, ViTGraph

__all__ = ["BlockInfo", "ImportedModel", "ViTGraph", "import_model", "load_torch_model"]
