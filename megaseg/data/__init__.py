"""The data layer: preference pairs and prompt sets from local files, chat templates, truncation, batches, sampling.

Modules (import from them directly; this package imports nothing heavy on its own):
- resources      data shipped with megaseg (`shipped_path`, `shipped:` paths in configs)
- record_files   raw records from jsonl / json / parquet / datasets directories, with file:line locations
- preference     PreferencePair, load_preference_pairs (conversational and flat formats)
- prompts        Prompt, load_prompts (UltraFeedback, MT-Bench, Arena-Hard)
- tokenizer      load_tokenizer (local HF directory or GGUF), padding_token_id
- rendering      ChatTemplateRenderer: prompt ids and EOS-terminated response ids from the chat template
- truncation     the paper's truncation rule on id lists
- encoding       pairs / prompts -> TokenizedPair / TokenizedPrompt (rendering + truncation + invalid rows)
- splits         train / eval sets from DataConfig
- batch          SequenceBatch, PreferenceBatch, PromptBatch and their collate functions
- sampler        ResumableShardedSampler: deterministic, resumable, data-parallel sharded order
"""
