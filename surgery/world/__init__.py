"""Layer 3: the planted-bias world: parameters, shapes, the deterministic generator, its language,
and training/saving a world CLIP.
"""
from __future__ import annotations

from surgery.world.params import (  # noqa: F401
    GENERATOR_VERSION,
    ATTRIBUTE_KINDS,
    WORLD_JSON,
    PARAMS_JSON,
    DEFAULT_CONCEPTS,
    DEFAULT_GROUPS,
    WorldParams,
    save_params,
    load_params,
)
from surgery.world.prompts import (  # noqa: F401
    CAPTION_TEMPLATES,
    QUERY_TEMPLATE,
    describe,
    neutral_queries,
    group_prompts,
)
from surgery.world.generator import (  # noqa: F401
    SPLITS,
    LABELS_CSV,
    CAPTIONS_CSV,
    IMAGES_DIR,
    DEFAULT_EVAL_SIZE,
    split_dir,
    WorldSplit,
    balanced_size,
    check_eval_size,
    generate,
    write_split,
    read_split,
)
from surgery.world.train import (  # noqa: F401
    WORLD_ARCH,
    WORLD_MODEL_CONFIG,
    WORLD_TOKENIZER,
    WorldTrainOptions,
    WorldQuality,
    world_vocabulary,
    build_world_clip,
    train_world_model,
    caption_truth,
    evaluate_world_model,
)
from surgery.world.checkpoint import (  # noqa: F401
    save_world_model,
    world_params_of,
)
