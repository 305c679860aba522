"""The convergence fixes of DETR's follow-up papers, each off by default and switched on by one config key:

    model.py   AdditionsDETR, which extends detr.DETR (a section per paper), and build_model
    loss.py    their matching costs and loss terms, which extend train.py's HungarianMatcher and SetCriterion
"""
