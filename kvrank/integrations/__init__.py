"""Rerankers for other frameworks, each an optional extra over the same `kvrank.Reranker`.

- `kvrank.integrations.langchain.KvrankRerank`: a LangChain document compressor (`pip install 'kvrank[langchain]'`),
  for `ContextualCompressionRetriever` or any chain that takes a `BaseDocumentCompressor`.
- `kvrank.integrations.llama_index.KvrankRerank`: a LlamaIndex node postprocessor
  (`pip install 'kvrank[llama-index]'`), for `node_postprocessors=[...]` in a query engine.

Both return exactly the order and the scores of `Reranker.rank` on the same texts, best first, and never change the
documents or nodes they are given. Importing one without its framework installed raises `ImportError` with the
install command.
"""
