"""Wire format: generated protobuf code (fedtune_pb2*, regenerate with scripts/gen_protos.sh),
`tensors` (safetensors blobs) and `serde` (domain ⇄ proto; the only importer of fedtune_pb2)."""
