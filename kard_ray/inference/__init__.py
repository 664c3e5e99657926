"""What test time needs, shared by batch evaluation and Serve: the text contracts (`formats`), the
reranker (`reranker`), the student generator (`generator`) and the per-method passage recipe
(`passages`). Training imports these contracts; nothing here imports training or evaluation.
"""
