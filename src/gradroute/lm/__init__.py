"""Language-model pieces shared by the LM experiments (unlearning, steering, token routing).

    corpus.py     procedural children's stories, the forget keyword rule, real-corpus loaders
    tokenizer.py  BPE trained on a corpus (cached) or GPT-2's BPE, both offline
    data.py       stories -> padded token rows with labels, seeded paired batch order
    train.py      THE training loop (AdamW, warmup + cosine, clip, eval, JSONL log, checkpoints,
                  resume, DDP under torchrun), with per-batch hooks for routing
    methods.py    unlearning methods on top of gradroute (base, filtering, ERA, parameter
                  routing, RMU, DEMix)
    evaluate.py   losses on held-out stories, keyword-excluded loss, retraining attack, samples
    sources.py    a user's corpus (jsonl/parquet/txt, folders, datasets folders, hub), memory-mapped token cache
    labels.py     forget rules: label field, keywords, regex, callable; evaluation (topic) field
    splits.py     held-out forget/attack/retain/validation/topic sets drawn by counts
    user_corpus.py  the above wired into `gradroute run lm-unlearning --corpus PATH` (docs/your_data.md)
    eval.py       `gradroute eval`: lm-evaluation-harness on saved models, local perplexity and
                  headword multiple-choice tasks from a run's held-out documents (docs/eval.md)
"""
