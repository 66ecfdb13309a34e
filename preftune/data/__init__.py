"""Layer 1, data: what comes in, as records and token ids. Imports only `errors` (and torch, transformers'
tokenizers); every layer above reads it.

- `read`: files, saved datasets, hub names, in-memory records -> validated `PreferencePair`s and prompts, with
  line-exact errors;
- `tokenize`: PreferencePair -> TokenizedPair (chat template, EOS, the prompt/completion boundary, truncation);
- `batching`: TokenizedPairs or Segments -> a `Batch` in the padded, shared-prefix or packed layout; shuffling and
  sharding;
- `prompts`: the online recipes' prompts, each distinct prompt once as given and as ids;
- `records`: JSONL / CSV output of generate, score and judge.
"""
