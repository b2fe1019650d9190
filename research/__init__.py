"""Research tools of a source checkout (not part of the installed ``offseg_hf`` package).

* ``python -m research.mine_prototypes``: ideal class representations W* = M·(Eᵀ)⁺ (paper Eq. 2) and the Fig. 3
  heat maps; the analysis is :mod:`research.prototypes`.
"""
