//! A paged KV cache's two kernels: writing the new tokens' keys/values into their slots, and
//! attention of one decoding query per sequence over that sequence's blocks.
//!
//! Layout: a cache tensor is `[num_blocks, kv_heads, block_size, head_dim]`; token slot
//! `s = block · block_size + offset`. A sequence's block table lists its blocks in order, so
//! its position p lives in block `table[p / block_size]` at offset `p % block_size`. Blocks of a
//! shared prompt prefix appear in several tables; they are only ever read.

use candle_core::{CpuStorage, DType, InplaceOp3, Layout, Result, Tensor};

use crate::{from_host, host_f32};

/// Reference of [`write_kv`] (also its CPU implementation, for any element type): `cache`
/// `[blocks, kvh, bs, d]`, `new` `[kvh, T, d]`.
pub fn write_kv_reference<T: Copy>(
    cache: &mut [T],
    new: &[T],
    slots: &[u32],
    kv_heads: usize,
    block_size: usize,
    d: usize,
) {
    let t = slots.len();
    for (i, &slot) in slots.iter().enumerate() {
        let (block, offset) = (slot as usize / block_size, slot as usize % block_size);
        for h in 0..kv_heads {
            let dst = ((block * kv_heads + h) * block_size + offset) * d;
            let src = (h * t + i) * d;
            cache[dst..dst + d].copy_from_slice(&new[src..src + d]);
        }
    }
}

/// Writes `new` `[kv_heads, T, head_dim]` (or `[1, kv_heads, T, head_dim]`), contiguous, into
/// `cache` at `slots` `[T]` (u32), in place.
pub fn write_kv(cache: &Tensor, new: &Tensor, slots: &Tensor) -> Result<()> {
    let (_, kvh, _, d) = cache.dims4()?;
    let t = slots.dim(0)?;
    let new = new.reshape((kvh, t, d))?;
    if new.dtype() != cache.dtype() || slots.dtype() != DType::U32 {
        candle_core::bail!(
            "write_kv: keys/values must have the cache's dtype {:?} and slots u32, got {:?} and {:?}",
            cache.dtype(),
            new.dtype(),
            slots.dtype()
        );
    }
    let (new, slots) = (new.contiguous()?, slots.contiguous()?);
    cache.inplace_op3(&new, &slots, &WriteKv)
}

struct WriteKv;

/// The cache's (blocks, kv_heads, block_size, head_dim) after checking it is contiguous.
fn cache_dims(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    if !l.is_contiguous() {
        candle_core::bail!("write_kv: the cache must be contiguous");
    }
    l.shape().dims4()
}

impl InplaceOp3 for WriteKv {
    fn name(&self) -> &'static str {
        "philo-write-kv"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        new: &CpuStorage,
        nl: &Layout,
        slots: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let (blocks, kvh, bs, d) = cache_dims(cl)?;
        let slots = &slots.as_slice::<u32>()?[sl.start_offset()..][..sl.shape().elem_count()];
        if let Some(&bad) = slots.iter().find(|&&s| s as usize >= blocks * bs) {
            candle_core::bail!(
                "write_kv: slot {bad} is outside the cache ({blocks} blocks of {bs})"
            );
        }
        let start = cl.start_offset();
        let n = nl.start_offset()..nl.start_offset() + nl.shape().elem_count();
        macro_rules! write {
            ($variant:ident) => {
                match (cache, new) {
                    (CpuStorage::$variant(c), CpuStorage::$variant(v)) => {
                        write_kv_reference(&mut c[start..], &v[n], slots, kvh, bs, d)
                    }
                    _ => candle_core::bail!("write_kv: cache and values differ in dtype"),
                }
            };
        }
        match new {
            CpuStorage::F32(_) => write!(F32),
            CpuStorage::BF16(_) => write!(BF16),
            CpuStorage::F16(_) => write!(F16),
            _ => candle_core::bail!("write_kv: the cache must be f32, bf16 or f16"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cl: &Layout,
        new: &candle_core::CudaStorage,
        nl: &Layout,
        slots: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        use crate::launch::*;
        use candle_core::backend::BackendStorage;
        let (blocks, kvh, bs, d) = cache_dims(cl)?;
        let t = sl.shape().elem_count();
        let num_slots = u32::try_from(blocks * bs).map_err(|_| {
            candle_core::Error::Msg("write_kv: the cache has more than 2³² slots".into())
        })?;
        let dev = cache.device().clone();
        let slots = contiguous::<u32>(slots, sl)?;
        let dtype = cache.dtype();
        with_float_type!(dtype, T, {
            let values = contiguous::<T>(new, nl)?;
            let start = cl.start_offset();
            let mut dst = cache.as_cuda_slice_mut::<T>()?.slice_mut(start..);
            let f = typed_function(&dev, &PAGED_ATTENTION, "write_kv", dtype)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (t32, kvh32, bs32, d32) = (t as i32, kvh as i32, bs as i32, d as i32);
            b.arg(&mut dst)
                .arg(&values)
                .arg(&slots)
                .arg(&t32)
                .arg(&kvh32)
                .arg(&bs32)
                .arg(&d32)
                .arg(&num_slots);
            unsafe { b.launch(elementwise_config(t * kvh * d)) }.w()?;
            Ok(())
        })
    }
}

/// Reference of [`paged_decode_attention`] on f32 data: `q` `[h, n, d]`, caches
/// `[blocks, kvh, bs, d]`, `tables` `[n, max_blocks]`, `lens` `[n]`; returns `[n, h, d]`.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_reference(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    tables: &[u32],
    lens: &[u32],
    heads: usize,
    kv_heads: usize,
    block_size: usize,
    d: usize,
    window: usize,
) -> Vec<f32> {
    let n = lens.len();
    let max_blocks = tables.len() / n.max(1);
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; n * heads * d];
    for (seq, &len) in lens.iter().enumerate() {
        let len = len as usize;
        let first = len.saturating_sub(window);
        let table = &tables[seq * max_blocks..(seq + 1) * max_blocks];
        // The cache elements of (kv head h, position p).
        let row = |h: usize, p: usize| -> std::ops::Range<usize> {
            let block = table[p / block_size] as usize;
            let at = ((block * kv_heads + h) * block_size + p % block_size) * d;
            at..at + d
        };
        for h in 0..heads {
            let kh = h / (heads / kv_heads);
            let qh = &q[(h * n + seq) * d..][..d];
            let scores: Vec<f32> = (first..len)
                .map(|p| {
                    let k = &k_cache[row(kh, p)];
                    qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let sum: f32 = scores.iter().map(|s| (s - max).exp()).sum();
            let o = &mut out[(seq * heads + h) * d..][..d];
            for (p, s) in (first..len).zip(&scores) {
                let w = (s - max).exp() / sum;
                for (o, v) in o.iter_mut().zip(&v_cache[row(kh, p)]) {
                    *o += w * v;
                }
            }
        }
    }
    out
}

/// Attention of one query per sequence (the token being decoded, at position `lens[i] − 1`)
/// over that sequence's cached keys/values: `q` `[heads, n, d]`, caches
/// `[blocks, kv_heads, block_size, d]`, `tables` `[n, max_blocks]` u32, `lens` `[n]` u32 (the
/// sequence length including the new token, whose K/V must already be written). Keys at least
/// `window` behind the query are masked. Returns `[n, heads, d]`.
pub fn paged_decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    tables: &Tensor,
    lens: &Tensor,
    window: usize,
) -> Result<Tensor> {
    let (h, n, d) = q.dims3()?;
    let (_, kvh, bs, _) = k_cache.dims4()?;
    let max_blocks = tables.dim(1)?;
    if tables.dims() != [n, max_blocks] || lens.dims() != [n] || h % kvh != 0 {
        candle_core::bail!(
            "paged_decode_attention: q {:?}, tables {:?}, lens {:?} do not fit caches {:?}",
            q.shape(),
            tables.shape(),
            lens.shape(),
            k_cache.shape()
        );
    }
    if q.device().is_cuda() {
        return paged_decode_cuda(q, k_cache, v_cache, tables, lens, window);
    }
    // Only the blocks the tables name, not the whole cache, are read into f32: they become
    // blocks 0.. of a small cache with tables to match.
    let named = tables.flatten_all()?;
    let local: Vec<u32> = (0..named.elem_count() as u32).collect();
    let out = paged_decode_reference(
        &host_f32(q)?,
        &host_f32(&k_cache.index_select(&named, 0)?)?,
        &host_f32(&v_cache.index_select(&named, 0)?)?,
        &local,
        &lens.to_vec1::<u32>()?,
        h,
        kvh,
        bs,
        d,
        window,
    );
    from_host(out, &[n, h, d], q.dtype(), q.device())
}

#[cfg(feature = "cuda")]
fn paged_decode_cuda(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    tables: &Tensor,
    lens: &Tensor,
    window: usize,
) -> Result<Tensor> {
    use crate::launch::*;
    let (h, n, d) = q.dims3()?;
    let (_, kvh, bs, _) = k_cache.dims4()?;
    let max_blocks = tables.dim(1)?;
    if d % 8 != 0 || d > 256 {
        candle_core::bail!(
            "paged_decode_attention on CUDA needs head_dim a multiple of 8, at most 256, got {d}"
        );
    }
    let dev = device(q)?;
    let (q, tables, lens) = (q.contiguous()?, tables.contiguous()?, lens.contiguous()?);
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k_cache.storage_and_layout();
    let (vs, vl) = v_cache.storage_and_layout();
    let (ts, tl) = tables.storage_and_layout();
    let (ls, ll) = lens.storage_and_layout();
    with_float_type!(q.dtype(), T, {
        let qv = contiguous::<T>(cuda(&qs)?, ql)?;
        let kv = contiguous::<T>(cuda(&ks)?, kl)?;
        let vv = contiguous::<T>(cuda(&vs)?, vl)?;
        let tv = contiguous::<u32>(cuda(&ts)?, tl)?;
        let lv = contiguous::<u32>(cuda(&ls)?, ll)?;
        let out = unsafe { dev.alloc::<T>(n * h * d)? };
        let f = function(&dev, &PAGED_ATTENTION, &decode_kernel_name(q.dtype(), d)?)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        // One block per (sequence, head): no split, so no split workspace.
        let ints = [
            n,
            h,
            kvh,
            d,
            bs,
            max_blocks,
            window.min(i32::MAX as usize),
            1,
        ]
        .map(|v| v as i32);
        b.arg(&qv).arg(&kv).arg(&vv).arg(&tv).arg(&lv).arg(&out);
        for v in &ints {
            b.arg(v);
        }
        let none = 0u64;
        b.arg(&none).arg(&none);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, h as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        Ok(tensor(out, &dev, (n, h, d)))
    })
}

/// The paged decode kernel for `dtype` and head dimension `d`: one compiled for `d` where there is
/// one (64, 96, 128), else the general one.
#[cfg(feature = "cuda")]
pub(crate) fn decode_kernel_name(dtype: DType, d: usize) -> Result<String> {
    let suffix = crate::launch::suffix(dtype)?;
    Ok(match d {
        64 | 96 | 128 => format!("paged_decode_{suffix}_d{d}"),
        _ => format!("paged_decode_{suffix}"),
    })
}

#[cfg(not(feature = "cuda"))]
fn paged_decode_cuda(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: usize,
) -> Result<Tensor> {
    candle_core::bail!("paged_decode_attention on a GPU needs the cuda feature")
}
