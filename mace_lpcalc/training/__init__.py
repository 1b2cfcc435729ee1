"""The training floor: training under a precision policy (:mod:`.train`) and the SPC/Fw reference engine and data (:mod:`.reference`)."""
