"""enactive-stream's models: a temporal and a body-schema processor integrated into one
moment per frame, as pure per-stream steps batched with `jax.vmap` and compiled ahead of
time over a device-resident state slab."""

from .body_schema import BodySchemaOutput, BodySchemaProcessor, BodyState
from .build import abstract_model, build_model, model_fingerprint
from .config import (
    MAX_DIM,
    MODEL_BOUNDS,
    BodySchemaConfig,
    ModelConfig,
    ModelConfigError,
    TemporalConfig,
)
from .factories import (
    create_body_schema_processor,
    create_body_schema_processor_no_jit,
    create_body_schema_processor_safe,
    create_temporal_processor,
    create_temporal_processor_no_jit,
    create_temporal_processor_safe,
)
from .jit import (
    CompilationCounter,
    JITCompilationError,
    JITStrategy,
    enable_compilation_cache,
    get_jit_info,
    safe_jit,
)
from .model import (
    MODALITIES,
    RECORD_FIELDS,
    EnactiveModel,
    EnactiveOutput,
    EnactiveState,
    pack_record,
)
from .params import ParamsMismatchError, load_params, save_params
from .slab import FLAG_RESET, FLAG_VALID, SNAPSHOT_ROWS, SlabSnapshot, SlabStep
from .temporal import TemporalOutput, TemporalProcessor, TemporalState

__all__ = [
    "FLAG_RESET",
    "FLAG_VALID",
    "MAX_DIM",
    "MODALITIES",
    "MODEL_BOUNDS",
    "RECORD_FIELDS",
    "SNAPSHOT_ROWS",
    "BodySchemaConfig",
    "BodySchemaOutput",
    "BodySchemaProcessor",
    "BodyState",
    "CompilationCounter",
    "EnactiveModel",
    "EnactiveOutput",
    "EnactiveState",
    "JITCompilationError",
    "JITStrategy",
    "ModelConfig",
    "ModelConfigError",
    "ParamsMismatchError",
    "SlabSnapshot",
    "SlabStep",
    "TemporalConfig",
    "TemporalOutput",
    "TemporalProcessor",
    "TemporalState",
    "abstract_model",
    "build_model",
    "create_body_schema_processor",
    "create_body_schema_processor_no_jit",
    "create_body_schema_processor_safe",
    "create_temporal_processor",
    "create_temporal_processor_no_jit",
    "create_temporal_processor_safe",
    "enable_compilation_cache",
    "get_jit_info",
    "load_params",
    "model_fingerprint",
    "pack_record",
    "safe_jit",
    "save_params",
]
