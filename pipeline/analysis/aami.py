"""AAMI EC57 beat classes and the MIT-BIH inter-patient split: the one home of these domain facts.

Needs nothing but Python: the daemon, the tools, the network definition and training all import it.
"""

from __future__ import annotations

# AAMI EC57 beat classes: N (normal and bundle branch block), S (SVEB), V (VEB), F (fusion), Q (unknown/paced).
AAMI_CLASSES = ("N", "S", "V", "F", "Q")
BACKGROUND = "background"
# The beat model's output classes: "no beat here" first, then the AAMI classes.
MODEL_CLASSES = (BACKGROUND, *AAMI_CLASSES)

# AAMI class of each MIT-BIH beat symbol (de Chazal et al. 2004); every other symbol is no beat.
AAMI_CLASS_OF_SYMBOL: dict[str, str] = {
    **dict.fromkeys("NLRej", "N"),
    **dict.fromkeys("aSAJ", "S"),
    **dict.fromkeys("VE", "V"),
    "F": "F",
    **dict.fromkeys("/fQ", "Q"),
}

# de Chazal et al. 2004 inter-patient split of the MIT-BIH Arrhythmia Database (paced records left out).
DS1 = ("101", "106", "108", "109", "112", "114", "115", "116", "118", "119", "122", "124",
       "201", "203", "205", "207", "208", "209", "215", "220", "223", "230")
DS2 = ("100", "103", "105", "111", "113", "117", "121", "123", "200", "202", "210", "212",
       "213", "214", "219", "221", "222", "228", "231", "232", "233", "234")
PACED = ("102", "104", "107", "217")
