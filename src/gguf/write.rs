//! Writes a GGUF that is the input with some tensors' bytes replaced.

use super::parse::{GgufFile, TensorInfo};
use super::value::{encode_str, Value};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::Write;

/// One encoded metadata entry.
pub fn encode_kv(key: &str, value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    encode_str(key, &mut out);
    out.extend(value.type_id().to_le_bytes());
    value.encode(&mut out);
    out
}

/// Writes `input` to `out` with:
/// - every metadata entry whose key does not start with `replace_prefix`
///   copied byte for byte, in order, then `extra_kvs` appended;
/// - tensor infos copied byte for byte (offsets are relative to the data
///   section, so a longer header does not move them);
/// - the tensors in `edited` replaced by what `produce` returns for them,
///   which must be exactly as long as the original;
/// - every other byte of the data section copied from the input.
pub fn write_patched(
    input: &GgufFile,
    replace_prefix: &str,
    extra_kvs: &[(String, Value)],
    edited: &[&TensorInfo],
    out: &mut File,
    mut produce: impl FnMut(&TensorInfo) -> Result<Vec<u8>>,
) -> Result<()> {
    let src = &input.mmap[..];
    let kept: Vec<_> = input
        .kvs
        .iter()
        .filter(|kv| !kv.key.starts_with(replace_prefix))
        .collect();
    let mut header = Vec::with_capacity(input.data_start as usize + 4096);
    header.extend(&src[..16]); // magic, version, tensor count
    header.extend(((kept.len() + extra_kvs.len()) as u64).to_le_bytes());
    for kv in kept {
        header.extend(&src[kv.raw.clone()]);
    }
    for (key, value) in extra_kvs {
        header.extend(encode_kv(key, value));
    }
    header.extend(&src[input.tensor_info_range.clone()]);
    header.resize(
        (header.len() as u64).next_multiple_of(input.alignment) as usize,
        0,
    );
    out.write_all(&header).context("writing header")?;

    let mut order: Vec<&TensorInfo> = edited.to_vec();
    order.sort_by_key(|t| t.offset);
    // A writer thread does all output I/O, in order, so that writing one
    // tensor (a kernel copy of up to hundreds of MB) overlaps producing the
    // next ones. Produced bytes wait in its queue up to QUEUED_BYTES.
    let budget = Budget::default();
    std::thread::scope(|scope| -> Result<()> {
        let (queue, jobs) = std::sync::mpsc::channel::<Output>();
        let budget = &budget;
        let writer = scope.spawn(move || -> Result<()> {
            // However the writer ends, a producer waiting for room wakes up.
            let _stop = StopOnDrop(budget);
            let mut writeback = Writeback::default();
            for job in jobs {
                match job {
                    Output::Copy(from, to) => copy_range(input, from, to, out)?,
                    Output::Tensor(name, bytes) => {
                        out.write_all(&bytes)
                            .with_context(|| format!("writing {name}"))?;
                        budget.release(bytes.len() as u64);
                    }
                }
                writeback.start(out);
            }
            out.flush()?;
            Ok(())
        });
        let produced = (|| -> Result<()> {
            let stopped = || anyhow::anyhow!("writer stopped");
            let mut pos = input.data_start; // next input byte to copy
            for t in order {
                let start = input.data_start + t.offset;
                queue
                    .send(Output::Copy(pos, start))
                    .map_err(|_| stopped())?;
                let bytes = produce(t)?;
                if bytes.len() as u64 != t.size {
                    bail!(
                        "{}: new data is {} bytes, expected {}",
                        t.name,
                        bytes.len(),
                        t.size
                    );
                }
                if !budget.reserve(bytes.len() as u64) {
                    return Err(stopped());
                }
                queue
                    .send(Output::Tensor(t.name.clone(), bytes))
                    .map_err(|_| stopped())?;
                pos = start + t.size;
            }
            queue
                .send(Output::Copy(pos, input.mmap.len() as u64))
                .map_err(|_| stopped())
        })();
        drop(queue);
        let written = writer.join().expect("writer thread panicked");
        // The writer's error explains a "writer stopped".
        written.and(produced)
    })
}

/// Starts the kernel's writeback of what has been written so far, without
/// waiting for it, so that the final `fsync` finds little left to write
/// instead of waiting with every core idle.
#[derive(Default)]
struct Writeback {
    started_to: u64,
}

impl Writeback {
    /// At least this much new data before another request.
    const STEP: u64 = 32 << 20;

    fn start(&mut self, out: &mut File) {
        #[cfg(target_os = "linux")]
        {
            use std::io::Seek;
            use std::os::fd::AsRawFd;
            let Ok(end) = out.stream_position() else {
                return;
            };
            if end < self.started_to + Self::STEP {
                return;
            }
            // SAFETY: a valid fd; SYNC_FILE_RANGE_WRITE only queues the
            // range's dirty pages for writing. A failure is harmless: the
            // final fsync writes whatever is left and reports any error.
            unsafe {
                libc::sync_file_range(
                    out.as_raw_fd(),
                    self.started_to as libc::off64_t,
                    (end - self.started_to) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.started_to = end;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = out;
    }
}

/// Bytes of produced tensors that may wait for the writer. A larger tensor
/// waits until the queue is empty.
const QUEUED_BYTES: u64 = 256 << 20;

/// Bytes queued for the writer, and whether it has stopped.
#[derive(Default)]
struct Budget {
    state: std::sync::Mutex<(u64, bool)>,
    changed: std::sync::Condvar,
}

impl Budget {
    /// Waits for room for `n` bytes and takes it; false if the writer
    /// stopped.
    fn reserve(&self, n: u64) -> bool {
        let mut state = self.state.lock().expect("budget lock");
        while !state.1 && state.0 > 0 && state.0 + n > QUEUED_BYTES {
            state = self.changed.wait(state).expect("budget lock");
        }
        state.0 += n;
        !state.1
    }

    fn release(&self, n: u64) {
        self.state.lock().expect("budget lock").0 -= n;
        self.changed.notify_all();
    }
}

struct StopOnDrop<'a>(&'a Budget);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        if let Ok(mut state) = self.0.state.lock() {
            state.1 = true;
        }
        self.0.changed.notify_all();
    }
}

/// What the writer thread does next.
enum Output {
    /// Input bytes `[from, to)`.
    Copy(u64, u64),
    Tensor(String, Vec<u8>),
}

/// Copies input bytes `[from, to)` to the current end of `out`, in the
/// kernel where it can (no page-cache copy through user space, reflinks on
/// filesystems that share extents).
fn copy_range(input: &GgufFile, from: u64, to: u64, out: &mut File) -> Result<()> {
    if to <= from {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let mut off_in = from as libc::loff_t;
        let mut left = (to - from) as usize;
        while left > 0 {
            // SAFETY: valid fds; the kernel advances off_in and out's position.
            let n = unsafe {
                libc::copy_file_range(
                    input.file.as_raw_fd(),
                    &mut off_in,
                    out.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    0,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    // Not supported across these filesystems: fall back below.
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => break,
                    _ => return Err(err).context("copying tensor data"),
                }
            }
            if n == 0 {
                bail!("input file shrank while copying");
            }
            left -= n as usize;
        }
        if left == 0 {
            return Ok(());
        }
        let done = off_in as u64;
        return copy_mapped(input, done, to, out);
    }
    #[allow(unreachable_code)]
    copy_mapped(input, from, to, out)
}

fn copy_mapped(input: &GgufFile, from: u64, to: u64, out: &mut File) -> Result<()> {
    const CHUNK: usize = 8 << 20;
    for chunk in input.mmap[from as usize..to as usize].chunks(CHUNK) {
        out.write_all(chunk).context("copying tensor data")?;
    }
    Ok(())
}

/// A tensor for a new file: name, ggml dims, type and encoded data.
pub struct NewTensor<'a> {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: crate::ffi::GgmlType,
    pub data: &'a [u8],
}

/// Encodes a whole new GGUF v3 (32-byte alignment) in memory.
pub fn encode_new(kvs: &[(String, Value)], tensors: &[NewTensor]) -> Vec<u8> {
    let align = super::DEFAULT_ALIGNMENT;
    let mut out = super::GGUF_MAGIC.to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        out.extend(encode_kv(k, v));
    }
    let mut offset = 0u64;
    for t in tensors {
        encode_str(&t.name, &mut out);
        out.extend((t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(t.ty.0.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset = (offset + t.data.len() as u64).next_multiple_of(align);
    }
    out.resize((out.len() as u64).next_multiple_of(align) as usize, 0);
    for t in tensors {
        out.extend(t.data);
        out.resize((out.len() as u64).next_multiple_of(align) as usize, 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A producer waiting for room wakes when the writer frees it, and when
    /// the writer stops (an I/O error), instead of waiting forever.
    #[test]
    fn the_writer_queue_never_leaves_a_producer_waiting() {
        let budget = Budget::default();
        assert!(budget.reserve(QUEUED_BYTES)); // full, but never refused when empty
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| budget.reserve(1));
            std::thread::sleep(Duration::from_millis(50));
            assert!(!waiter.is_finished(), "no room yet");
            budget.release(QUEUED_BYTES);
            assert!(waiter.join().unwrap(), "room freed");
        });
        budget.release(1);
        assert!(budget.reserve(QUEUED_BYTES));
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| budget.reserve(1));
            std::thread::sleep(Duration::from_millis(50));
            drop(StopOnDrop(&budget)); // the writer ends with an error
            assert!(!waiter.join().unwrap(), "a stopped writer refuses");
        });
    }
}
