"""Frontend: load a ViT (timm name, torch module or ONNX file), import it into Relax, and read
its geometry (blocks, heads, MLP widths, tokens) from the Relax module. The importer (TVM) is
loaded on first use, so model loading alone stays light."""

from vitsparse._lazy import lazy_api
from vitsparse.frontend.loading import RANDOM_WEIGHTS_SEED, load_torch_model
from vitsparse.frontend.vit_graph import BlockInfo, ViTGraph

__all__ = [
    "RANDOM_WEIGHTS_SEED",
    "BlockInfo",
    "ImportedModel",
    "ViTGraph",
    "export_torch",
    "import_model",
    "load_torch_model",
]

_IMPORTER = "vitsparse.frontend.importer"
__getattr__, __dir__ = lazy_api(
    __name__,
    {"ImportedModel": _IMPORTER, "export_torch": _IMPORTER, "import_model": _IMPORTER},
    eager=("BlockInfo", "RANDOM_WEIGHTS_SEED", "ViTGraph", "load_torch_model"),
)
