//! Weight quantisation: NF4 compatible with bitsandbytes.
