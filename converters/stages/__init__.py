"""The conversion's stages, each passing frozen values to the next.

prepare (:mod:`.prepare`, :mod:`.inputs`) -> build candidates (:mod:`..strategies`) ->
evaluate (:mod:`.evaluate`) -> choose (:mod:`.choose`) -> package (:mod:`.package`);
:mod:`.journal` is the log every stage writes to, :mod:`.report` assembles report.json.
:mod:`..pipeline` runs them in order.
"""
