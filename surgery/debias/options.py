"""The options of ``clipsurgery debias``: targets, which edit kinds, how the probes are drawn."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from surgery.debias.balance import BalanceOptions
from surgery.debias.budget import Budget
from surgery.debias.open_balance import OpenBalanceOptions
from surgery.errors import SurgeryError

REMOVAL_MODES = ("auto", "always")

# "auto": the open balance (every text corrected at run time) when it alone meets the targets on the
# selection draws, else the fixed map fitted on the query list; "open" / "fixed": that one only
BALANCE_MODES = ("auto", "open", "fixed")


@dataclass
class DebiasOptions:
    budget: Budget = field(default_factory=Budget)  # targets on the report's images: bias ratio, accuracy, recall
    max_heads: int = 8  # most heads edited
    k: int = 50  # MaxSkew@K
    n_probe: int | None = None  # world models: images per generated split (None: ~1200, a multiple of concepts x groups)
    selection_draws: int = 8  # world models: independent selection draws the search averages over
    tower: str = "both"  # ONNX towers
    force: bool = False  # overwrite outputs
    heads: bool = True  # search head edits
    neurons: bool = True  # train an SAE and deactivate social neurons (vision embedding)
    balance: bool = True  # fit the balance edit (a low-rank map of the text embedding) and search it with the others
    # "auto": removal edits (heads, neurons) are searched only when the balance edit alone misses the
    # targets on the selection draws, and the search stops at the target; "always": searched in any
    # case, and the search goes on while an edit lowers bias within the budgets (the report then
    # shows what each kind adds)
    removal: str = "auto"
    balance_options: BalanceOptions = field(default_factory=BalanceOptions)  # side, neighbourhood, ridge, ...
    balance_mode: str = "auto"  # which balance: see BALANCE_MODES
    # bank, neighbours (None: K)
    open_options: OpenBalanceOptions = field(default_factory=lambda: OpenBalanceOptions(neighbours=None))
    search_trials: int | None = 1000  # the edit search measures at most this many sets (None: no limit)
    search_seconds: float | None = None  # ...and runs at most this long (None: no limit)
    # The edits are chosen on selection probes (other draws than the report's images); the accuracy
    # and recall budgets are tightened by this much there so that they still hold on the report's split.
    selection_margin: float = 0.005
    # ... and the bias target by this much (MaxSkew@K of 6-12 queries on a new draw is noisy).
    selection_bias_margin: float = 0.05
    # Folder probes: this fraction of the labelled images (of each group) is held out of the edit
    # search and used for the report only; 0 chooses and reports on the same images.
    holdout: float = 0.5
    # World models: unlabelled train-split images the SAE trains on (enough for an x8 SAE on a
    # 64-wide embedding to see every concept x group cell many times; 800 steps of 256 revisit them).
    sae_images: int = 4000
    # Probe images the ONNX parity gate checks beside its own inputs (real images, not noise).
    parity_images: int = 64

    def __post_init__(self) -> None:
        if not 0 <= self.holdout < 1:
            raise SurgeryError(f"--holdout must be at least 0 and below 1, got {self.holdout}")
        if not (self.heads or self.neurons or self.balance):
            raise SurgeryError("nothing to do: every edit kind is switched off")
        if self.search_trials is not None and self.search_trials < 1:
            raise SurgeryError(f"--search-trials must be >= 1, got {self.search_trials}")
        if self.search_seconds is not None and not self.search_seconds > 0:
            raise SurgeryError(f"--search-seconds must be > 0, got {self.search_seconds}")
        if self.removal not in REMOVAL_MODES:
            raise SurgeryError(f"--removal must be one of {', '.join(REMOVAL_MODES)}, got {self.removal!r}")
        if self.balance_mode not in BALANCE_MODES:
            raise SurgeryError(f"--balance-mode must be one of {', '.join(BALANCE_MODES)}, got {self.balance_mode!r}")
        if self.balance_mode == "open" and self.balance_options.side != "text":
            raise SurgeryError("the open balance corrects texts: --balance-mode open needs --side text")
        if self.balance_options.k != self.k:
            self.balance_options = dataclasses.replace(self.balance_options, k=self.k)
        if self.open_options.neighbours is None:  # the open balance equalises each group's K nearest images
            self.open_options = dataclasses.replace(self.open_options, neighbours=self.k)

    def selection_budget(self) -> Budget:
        """The budget the searches aim for on the selection probes (tightened by the margins)."""
        return self.budget.tightened(self.selection_margin, self.selection_bias_margin)
