"""Offline R2R router training: label the SLM's tokens with the LLM, train and calibrate the MLP router.

Stages (each writes into its own folder under the run folder and skips work it already finished):

1. `generate`  — the LLM answers the prompt set greedily (batched, left-padded).
2. `teacher`   — the SLM runs teacher-forced over prompt + LLM answer, one forward per batch, and stores
                 its greedy prediction and the router features at every answer position, computed with
                 the same maths as the serving worker (`FeatureBatch.from_logits`).
3. `continue_` — at every position where the SLM's token differs from the LLM's, the LLM continues from
                 prefix + SLM token to the end of the line/sentence (the LLM's own answer is its
                 continuation from prefix + LLM token: it is greedy).
4. `verify`    — a verifier (the LLM as judge by default, or a cheap proxy) decides whether the two
                 continuations differ in meaning: divergent (1) or neutral (0).
5. `dataset`   — features + labels as safetensors shards and a stats JSON.

Then `train` (class-weighted BCE, early stopping on a by-sequence validation split, loss/recall plot) and
`calibrate` (threshold for a target recall or LLM share, the curve stored in the checkpoint).
"""
