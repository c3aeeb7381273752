"""How far a localization trusts the intrinsics it is given (each mode is a prior, see `pipeline.pose`), and what
became of them (the source of the camera a pose was solved with).

Its own module, free of imports, so that the command line offers the modes without loading pydantic or numpy.
"""

from typing import Literal

IntrinsicsMode = Literal["fixed", "refine", "estimate"]
IntrinsicsSource = Literal["given", "refined", "estimated"]
