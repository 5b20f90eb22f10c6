//! `PHILO_PROFILE=1`: GPU time per named operation, from CUDA events recorded around each one
//! (on the CPU, wall time). [`time`] measures, [`report`] prints the table and starts over.
//! Without the variable, [`time`] only runs its closure.

use std::cell::RefCell;
use std::sync::OnceLock;

use candle_core::{Device, Result};

/// Whether `PHILO_PROFILE=1` is set (read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("PHILO_PROFILE").as_deref() == Ok("1"))
}

enum Mark {
    #[cfg(feature = "cuda")]
    Cuda(
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
    ),
    Wall(f64),
}

thread_local! {
    static MARKS: RefCell<Vec<(&'static str, Mark)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f`, attributing its device time to `name` when profiling.
pub fn time<T>(device: &Device, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !enabled() {
        return f();
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
        use candle_core::cuda_backend::WrapErr;
        let stream = dev.cuda_stream();
        let start = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .w()?;
        let out = f()?;
        let end = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .w()?;
        MARKS.with(|m| m.borrow_mut().push((name, Mark::Cuda(start, end))));
        return Ok(out);
    }
    let _ = device;
    let start = std::time::Instant::now();
    let out = f()?;
    let seconds = start.elapsed().as_secs_f64();
    MARKS.with(|m| m.borrow_mut().push((name, Mark::Wall(seconds * 1e3))));
    Ok(out)
}

/// Prints the time of every operation measured since the last report (total, calls, share),
/// largest first, to stderr, and forgets them.
pub fn report(title: &str) -> Result<()> {
    let marks = MARKS.with(|m| std::mem::take(&mut *m.borrow_mut()));
    if marks.is_empty() {
        return Ok(());
    }
    let mut totals: Vec<(&'static str, f64, usize)> = Vec::new();
    let gaps = gaps_between(&marks)?;
    for (name, mark) in marks {
        // Without the `cuda` feature the match has one arm.
        #[allow(clippy::infallible_destructuring_match)]
        let ms = match mark {
            #[cfg(feature = "cuda")]
            Mark::Cuda(start, end) => {
                use candle_core::cuda_backend::WrapErr;
                start.elapsed_ms(&end).w()? as f64
            }
            Mark::Wall(ms) => ms,
        };
        match totals.iter_mut().find(|(n, _, _)| *n == name) {
            Some(entry) => {
                entry.1 += ms;
                entry.2 += 1;
            }
            None => totals.push((name, ms, 1)),
        }
    }
    totals.sort_by(|a, b| b.1.total_cmp(&a.1));
    let sum: f64 = totals.iter().map(|t| t.1).sum();
    eprintln!("[profile] {title}: {sum:.1} ms in timed operations");
    for (name, ms, calls) in totals {
        eprintln!(
            "[profile]   {name:<28} {ms:>9.2} ms {calls:>6} calls {:>5.1} %",
            100.0 * ms / sum
        );
    }
    if !gaps.is_empty() {
        let total: f64 = gaps.iter().map(|g| g.2).sum();
        eprintln!(
            "[profile] {total:.1} ms between timed operations (untimed work, idle), largest:"
        );
        for (before, after, ms, count) in gaps.iter().take(GAPS_SHOWN) {
            eprintln!("[profile]   {before} → {after}: {ms:.2} ms over {count} gaps");
        }
    }
    Ok(())
}

/// Gap pairs listed by [`report`].
const GAPS_SHOWN: usize = 10;

/// Device time from the end of each timed operation to the start of the next, summed by the
/// pair of names around it (largest first): the work nobody timed and the device's idle time.
/// Nested operations (an inner one ends before its outer one starts) give negative spans,
/// which are left out.
#[allow(clippy::type_complexity)]
fn gaps_between(
    marks: &[(&'static str, Mark)],
) -> Result<Vec<(&'static str, &'static str, f64, usize)>> {
    let mut gaps: Vec<(&'static str, &'static str, f64, usize)> = Vec::new();
    #[cfg(feature = "cuda")]
    for pair in marks.windows(2) {
        use candle_core::cuda_backend::WrapErr;
        let ((before, Mark::Cuda(_, end)), (after, Mark::Cuda(start, _))) = (&pair[0], &pair[1])
        else {
            continue;
        };
        let ms = end.elapsed_ms(start).w()? as f64;
        if ms <= 0.0 {
            continue;
        }
        match gaps.iter_mut().find(|g| g.0 == *before && g.1 == *after) {
            Some(g) => {
                g.2 += ms;
                g.3 += 1;
            }
            None => gaps.push((before, after, ms, 1)),
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = marks;
    gaps.sort_by(|a, b| b.2.total_cmp(&a.2));
    Ok(gaps)
}
