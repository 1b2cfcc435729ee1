"""The precision floor: named policies and the model transform that applies them (:mod:`.policies`, :mod:`.casting`), training policies, ``policy="auto"`` and the live fp64 sentinel."""
