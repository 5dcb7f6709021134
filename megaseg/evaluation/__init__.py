"""Evaluating trained models like the paper: benchmark answer files (`megaseg generate`), a judge-free pairwise
proxy scored by a reward model (`megaseg compare`), and the segment-reward view (`megaseg show-segments`)."""
