/*
 * tiny_model.h — a Moondream-shaped config small enough that a whole
 * checkpoint for it (fuzz/data/tiny.safetensors, written by make_corpus.py,
 * 60 tensors, a few KB) fits in one fuzz input: with it, md_weights_bind can
 * succeed, so the fuzzer reaches every name and shape check, not only the
 * first one. Same sizes as make_corpus.py's TINY.
 */
#ifndef ALBEDO_FUZZ_TINY_MODEL_H
#define ALBEDO_FUZZ_TINY_MODEL_H

static const char tiny_config_json[] =
    "{\"config\": {"
    "\"vision\": {\"crop_size\": 4, \"enc_patch_size\": 2, \"in_channels\": 1, \"enc_dim\": 4,"
    " \"enc_n_layers\": 1, \"enc_n_heads\": 1, \"enc_ff_dim\": 4, \"max_crops\": 2,"
    " \"overlap_margin\": 0, \"proj_inner_dim\": 4, \"proj_out_dim\": 8},"
    "\"text\": {\"dim\": 8, \"ff_dim\": 4, \"n_layers\": 1, \"vocab_size\": 4, \"max_context\": 16,"
    " \"n_heads\": 1, \"n_kv_heads\": 1},"
    "\"region\": {\"dim\": 8, \"coord_feat_dim\": 2, \"coord_out_dim\": 2, \"size_feat_dim\": 2,"
    " \"size_out_dim\": 2, \"inner_dim\": 4}}}";

#endif
