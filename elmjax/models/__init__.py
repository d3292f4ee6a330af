"""Model families, one folder each (openelm/, ...), and the registry that finds them by
`config.model.family`. The interface a family fills is `elmjax.models.family.ModelFamily`."""

from elmjax.models.registry import for_hf_model_type, get, names, register

__all__ = ["for_hf_model_type", "get", "names", "register"]
