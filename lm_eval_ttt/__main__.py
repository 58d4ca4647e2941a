"""``python -m lm_eval_ttt ...``: the stock ``lm_eval`` CLI with the ttt-nn models registered."""

from lm_eval_ttt._registration import lm_eval_main

lm_eval_main()
