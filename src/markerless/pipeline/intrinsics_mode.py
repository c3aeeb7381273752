"""How far a localization trusts the intrinsics it is given (each mode is a prior, see `pipeline.pose`).

Its own module, free of imports, so that the command line offers the modes without loading pydantic or numpy.
"""

from typing import Literal

IntrinsicsMode = Literal["fixed", "refine", "estimate"]
