"""Look inside a language model: hook points with TransformerLens's names on both families (run_with_hooks,
run_with_cache, `with model.hooks(...)`), the activation cache and its residual-stream helpers, the logit lens,
and experiments (activation patching, direct logit attribution, induction scores).

(hooks is imported first and imports no model: the model families import it as they load.)"""
from .hooks import HookedModel
from .cache import ActivationCache
from .experiments import (LogitAttribution, PatchingResult, activation_patching, direct_logit_attribution,
                          induction_scores)
from .lens import LogitLens, layer_logits, logit_lens
