"""Layer 3: the planted-bias world: parameters, shapes, the deterministic generator, its language,
and training/saving a world CLIP.
"""
from __future__ import annotations

from surgery.world.checkpoint import (  # noqa: F401
    save_world_model,
    world_params_of,
)
from surgery.world.generator import (  # noqa: F401
    CAPTIONS_CSV,
    DEFAULT_EVAL_SIZE,
    IMAGES_DIR,
    LABELS_CSV,
    SPLITS,
    WorldSplit,
    balanced_size,
    check_eval_size,
    generate,
    read_split,
    split_dir,
    write_split,
)
from surgery.world.params import (  # noqa: F401
    ATTRIBUTE_KINDS,
    DEFAULT_CONCEPTS,
    DEFAULT_GROUPS,
    GENERATOR_VERSION,
    PARAMS_JSON,
    WORLD_JSON,
    WorldParams,
    load_params,
    save_params,
)
from surgery.world.prompts import (  # noqa: F401
    CAPTION_TEMPLATES,
    QUERY_TEMPLATE,
    describe,
    group_prompts,
    neutral_queries,
)
from surgery.world.train import (  # noqa: F401
    WORLD_ARCH,
    WORLD_MODEL_CONFIG,
    WORLD_TOKENIZER,
    WorldQuality,
    WorldTrainOptions,
    build_world_clip,
    caption_truth,
    evaluate_world_model,
    train_world_model,
    world_vocabulary,
)
