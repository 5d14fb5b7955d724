"""The pruning plan: its JSON format (`format`), its structural part (`structure`), and its
meaning in PyTorch (`pruned_vit`, `reference`), in one package below everything that makes or
compiles plans."""

from vitsparse._weights import weights_seed_of
from vitsparse.plan.format import (
    BLOCK_SIZE_PATTERN,
    BLOCK_SIZES,
    PLAN_FORMAT,
    PLAN_VERSION,
    SUPPORTED_VERSIONS,
    BlockMask,
    PruningPlan,
    check_block_geometry,
    load_plan,
    parse_block_size,
)
from vitsparse.plan.pruned_vit import apply_structure, geometry_of, structural_support
from vitsparse.plan.reference import (
    apply_plan_to_torch,
    hash_named_weights,
    validate_plan,
    weights_hash,
)
from vitsparse.plan.structure import (
    TOKEN_RULES,
    BlockStructure,
    IndexSet,
    Structure,
    TokenKeep,
    ViTGeometry,
    check_against,
)

__all__ = [
    "BLOCK_SIZE_PATTERN",
    "BLOCK_SIZES",
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "SUPPORTED_VERSIONS",
    "TOKEN_RULES",
    "BlockMask",
    "BlockStructure",
    "IndexSet",
    "PruningPlan",
    "Structure",
    "TokenKeep",
    "ViTGeometry",
    "apply_plan_to_torch",
    "apply_structure",
    "check_against",
    "check_block_geometry",
    "geometry_of",
    "load_plan",
    "parse_block_size",
    "structural_support",
    "validate_plan",
    "weights_hash",
    "hash_named_weights",
    "weights_seed_of",
]
