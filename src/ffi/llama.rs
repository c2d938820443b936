//! Safe wrappers over llama.cpp's C API.

use super::sys;
use anyhow::{anyhow, bail, Context as _, Result};
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Once;

static VERBOSE: AtomicBool = AtomicBool::new(false);

unsafe extern "C" fn log_callback(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    if VERBOSE.load(Ordering::Relaxed) || level == sys::GGML_LOG_LEVEL_ERROR {
        // SAFETY: llama.cpp passes a NUL-terminated string.
        eprint!("{}", unsafe { CStr::from_ptr(text) }.to_string_lossy());
    }
}

/// Initialises llama.cpp once per process. Its logging goes to stderr only
/// for errors, or for everything when `verbose`.
pub fn init_backend(verbose: bool) {
    static INIT: Once = Once::new();
    VERBOSE.store(verbose, Ordering::Relaxed);
    INIT.call_once(|| unsafe {
        // SAFETY: global initialisation, run once.
        sys::llama_log_set(Some(log_callback), std::ptr::null_mut());
        sys::llama_backend_init();
    });
}

/// A loaded model.
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    vocab: *const sys::llama_vocab,
}

// SAFETY: a llama_model is immutable after loading and shared across contexts.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: we own the model; contexts borrow it and are dropped first.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

impl Model {
    /// Loads a GGUF with `n_gpu_layers` offloaded (0 on CPU-only builds).
    pub fn load(path: &Path, n_gpu_layers: i32) -> Result<Model> {
        init_backend(VERBOSE.load(Ordering::Relaxed));
        let cpath = CString::new(path.to_string_lossy().as_bytes()).context("path contains NUL")?;
        // SAFETY: default params, then a plain load call.
        let ptr = unsafe {
            let mut params = sys::llama_model_default_params();
            params.n_gpu_layers = n_gpu_layers;
            sys::llama_model_load_from_file(cpath.as_ptr(), params)
        };
        let ptr = NonNull::new(ptr).ok_or_else(|| {
            anyhow!(
                "llama.cpp could not load {} (run with -v for its log)",
                path.display()
            )
        })?;
        // SAFETY: valid model.
        let vocab = unsafe { sys::llama_model_get_vocab(ptr.as_ptr()) };
        Ok(Model { ptr, vocab })
    }

    pub fn n_layer(&self) -> usize {
        // SAFETY: valid model.
        unsafe { sys::llama_model_n_layer(self.ptr.as_ptr()) as usize }
    }

    pub fn n_embd(&self) -> usize {
        // SAFETY: valid model.
        unsafe { sys::llama_model_n_embd(self.ptr.as_ptr()) as usize }
    }

    pub fn n_vocab(&self) -> usize {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_n_tokens(self.vocab) as usize }
    }

    pub fn n_ctx_train(&self) -> usize {
        // SAFETY: valid model.
        unsafe { sys::llama_model_n_ctx_train(self.ptr.as_ptr()) as usize }
    }

    /// A metadata value as a string.
    pub fn meta(&self, key: &str) -> Option<String> {
        let ckey = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: buf is writable for its length.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.ptr.as_ptr(),
                    ckey.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                return None;
            }
            if (n as usize) < buf.len() {
                buf.truncate(n as usize);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n as usize + 1, 0);
        }
    }

    /// The model's own chat template (`tokenizer.chat_template`).
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: returns a pointer owned by the model, or null.
        let p = unsafe { sys::llama_model_chat_template(self.ptr.as_ptr(), std::ptr::null()) };
        // SAFETY: NUL-terminated when non-null.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// Tokenizes `text`; `parse_special` turns `<|im_end|>`-style markers into
    /// their control tokens.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<i32>> {
        let len = i32::try_from(text.len()).context("text too long to tokenize")?;
        let mut tokens = vec![0i32; text.len() + 8];
        loop {
            // SAFETY: tokens is writable for its length; text is read for len bytes.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab,
                    text.as_ptr().cast(),
                    len,
                    tokens.as_mut_ptr(),
                    tokens.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                tokens.truncate(n as usize);
                return Ok(tokens);
            }
            if n == i32::MIN {
                bail!("tokenizer failed");
            }
            tokens.resize((-n) as usize, 0);
        }
    }

    /// The text of one token (control tokens rendered as their markers).
    pub fn token_to_piece(&self, token: i32) -> String {
        String::from_utf8_lossy(&self.piece(token, true)).into_owned()
    }

    /// Raw bytes of a token (control tokens omitted), for assembling UTF-8
    /// across token boundaries.
    pub fn token_bytes(&self, token: i32) -> Vec<u8> {
        self.piece(token, false)
    }

    fn piece(&self, token: i32, special: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: buf is writable for its length.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab,
                    token,
                    buf.as_mut_ptr().cast(),
                    buf.len() as i32,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    /// The beginning-of-sequence token, if the vocabulary has one.
    pub fn bos(&self) -> Option<i32> {
        // SAFETY: valid vocab.
        let t = unsafe { sys::llama_vocab_bos(self.vocab) };
        (t >= 0).then_some(t)
    }

    /// The tokenizer adds a BOS token to a text tokenized with `add_special`.
    pub fn adds_bos(&self) -> bool {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab) }
    }

    pub fn is_eog(&self, token: i32) -> bool {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_is_eog(self.vocab, token) }
    }
}

/// Formats a conversation with a llama.cpp chat template (a built-in name
/// such as `chatml`, or a template string it recognises).
pub fn apply_chat_template(
    template: &str,
    messages: &[(&str, &str)],
    add_assistant: bool,
) -> Result<String> {
    let tmpl = CString::new(template).context("template contains NUL")?;
    let owned: Vec<(CString, CString)> = messages
        .iter()
        .map(|(r, c)| Ok((CString::new(*r)?, CString::new(*c)?)))
        .collect::<Result<_, std::ffi::NulError>>()
        .context("message contains NUL")?;
    let chat: Vec<sys::llama_chat_message> = owned
        .iter()
        .map(|(r, c)| sys::llama_chat_message {
            role: r.as_ptr(),
            content: c.as_ptr(),
        })
        .collect();
    let mut buf = vec![0u8; 1024 + messages.iter().map(|(_, c)| c.len() * 2).sum::<usize>()];
    loop {
        // SAFETY: chat points at live CStrings; buf is writable for its length.
        let n = unsafe {
            sys::llama_chat_apply_template(
                tmpl.as_ptr(),
                chat.as_ptr(),
                chat.len(),
                add_assistant,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
            )
        };
        if n < 0 {
            bail!("llama.cpp does not support this chat template");
        }
        if (n as usize) <= buf.len() {
            buf.truncate(n as usize);
            return String::from_utf8(buf).context("template produced invalid UTF-8");
        }
        buf.resize(n as usize, 0);
    }
}

/// Names of llama.cpp's built-in chat templates.
pub fn builtin_chat_templates() -> Vec<String> {
    // SAFETY: first call counts, second fills; strings are static.
    unsafe {
        let n = sys::llama_chat_builtin_templates(std::ptr::null_mut(), 0);
        let mut ptrs = vec![std::ptr::null(); n.max(0) as usize];
        sys::llama_chat_builtin_templates(ptrs.as_mut_ptr(), ptrs.len());
        ptrs.into_iter()
            .map(|p| CStr::from_ptr(p).to_string_lossy().into_owned())
            .collect()
    }
}

/// A residual-stream node the hook can see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// Token embeddings entering layer 0: the unnamed `get_rows` from
    /// `token_embd.weight` (before any architecture-specific scaling).
    Embeddings,
    /// The token embeddings after an architecture's scaling (`inp_scaled`,
    /// Gemma's × √n_embd): no write of its own.
    ScaledEmbeddings,
    /// The residual between attention and MLP of layer N
    /// (`ffn_inp-N` in llama/qwen2, `sa_out-N` in gemma2/3).
    MidLayer(usize),
    /// The residual after layer N (`l_out-N`).
    LayerOut(usize),
    /// The final normalised hidden state that meets the unembedding (`result_norm`).
    FinalNorm,
    /// Layer N's attention projection output (`attn_output.weight` times
    /// its input), before any post-norm: the unnamed `mul_mat`.
    AttnProj(usize),
    /// Layer N's dense MLP output (`ffn_down.weight` times its input),
    /// before any post-norm: the unnamed `mul_mat`.
    FfnProj(usize),
}

impl Node {
    fn of(t: &sys::ggml_tensor) -> Option<Node> {
        // SAFETY: names are NUL-terminated fixed arrays; src pointers are
        // null or valid tensors of the same graph.
        let name = unsafe { CStr::from_ptr(t.name.as_ptr()) }.to_str().ok()?;
        if t.op == sys::GGML_OP_GET_ROWS {
            let table = unsafe { t.src[0].as_ref() }?;
            let table_name = unsafe { CStr::from_ptr(table.name.as_ptr()) };
            return (table_name.to_bytes() == b"token_embd.weight").then_some(Node::Embeddings);
        }
        if t.op == sys::GGML_OP_MUL_MAT {
            return Node::projection(t);
        }
        Node::from_name(name).or_else(|| Node::unnamed_mid_layer(t))
    }

    /// A `mul_mat` by a residual writer's weight: `blk.N.attn_output.weight`
    /// or `blk.N.ffn_down.weight`.
    fn projection(t: &sys::ggml_tensor) -> Option<Node> {
        // SAFETY: as in `of`.
        let weight = unsafe { t.src[0].as_ref() }?;
        let name = unsafe { CStr::from_ptr(weight.name.as_ptr()) }
            .to_str()
            .ok()?;
        let (layer, proj) = name.strip_prefix("blk.")?.split_once('.')?;
        let layer = layer.parse().ok()?;
        match proj {
            "attn_output.weight" => Some(Node::AttnProj(layer)),
            "ffn_down.weight" => Some(Node::FfnProj(layer)),
            _ => None,
        }
    }

    /// Phi-3's residual between attention and MLP is an unnamed `add` of
    /// the attention projection (row-selected on the last layer) and the
    /// residual: recognised by that projection among its sources. A bias
    /// add (`attn_output.bias`) is not a residual.
    fn unnamed_mid_layer(t: &sys::ggml_tensor) -> Option<Node> {
        if t.op != sys::GGML_OP_ADD {
            return None;
        }
        // SAFETY: as in `of`.
        let srcs = unsafe { [t.src[0].as_ref()?, t.src[1].as_ref()?] };
        let is_weight = |s: &sys::ggml_tensor| {
            let name = unsafe { CStr::from_ptr(s.name.as_ptr()) }.to_bytes();
            name.ends_with(b".weight") || name.ends_with(b".bias")
        };
        if srcs.iter().any(|s| is_weight(s)) {
            return None;
        }
        srcs.iter().find_map(|s| {
            let s = if s.op == sys::GGML_OP_GET_ROWS {
                unsafe { s.src[0].as_ref() }?
            } else {
                s
            };
            match (s.op == sys::GGML_OP_MUL_MAT).then(|| Node::projection(s))?? {
                Node::AttnProj(layer) => Some(Node::MidLayer(layer)),
                _ => None,
            }
        })
    }

    fn from_name(name: &str) -> Option<Node> {
        match name {
            "result_norm" => return Some(Node::FinalNorm),
            "inp_scaled" => return Some(Node::ScaledEmbeddings),
            _ => {}
        }
        let (kind, layer) = name.rsplit_once('-')?;
        let layer = layer.parse().ok()?;
        match kind {
            "l_out" => Some(Node::LayerOut(layer)),
            "ffn_inp" | "sa_out" => Some(Node::MidLayer(layer)),
            _ => None,
        }
    }
}

/// Reads or rewrites residual-stream activations during a decode.
pub trait ResidualHook {
    /// Whether to be called for this node in the current decode.
    fn wants(&mut self, node: Node) -> bool;
    /// `rows` holds `rows.len() / n_embd` token rows of `n_embd` floats.
    /// When the node holds every token of the batch, row i is batch token i;
    /// the last layer may hold only the output tokens, in batch order.
    /// Return true if `rows` was modified.
    fn visit(&mut self, node: Node, rows: &mut [f32], n_embd: usize) -> bool;
    /// Whether to see the input (the activations) of every `mul_mat` by the
    /// weight named `weight`, as `llama-imatrix` does.
    fn wants_input(&mut self, _weight: &str) -> bool {
        false
    }
    /// `rows` holds `rows.len() / row_len` input rows of `row_len` floats
    /// (one per token the product saw), read-only.
    fn visit_input(&mut self, _weight: &str, _rows: &[f32], _row_len: usize) {}
}

/// The weight a `mul_mat` multiplies by, named as in the GGUF: a backend's
/// copy (`CUDA0#blk.0.attn_k.weight#0`) is reduced to the weight's name,
/// as `llama-imatrix` does.
fn mul_mat_weight(t: &sys::ggml_tensor) -> Option<&str> {
    if t.op != sys::GGML_OP_MUL_MAT {
        return None;
    }
    // SAFETY: src pointers are null or valid tensors of the same graph;
    // names are NUL-terminated fixed arrays.
    let weight = unsafe { t.src[0].as_ref() }?;
    let name = unsafe { CStr::from_ptr(weight.name.as_ptr()) }
        .to_str()
        .ok()?;
    Some(match name.split_once('#') {
        Some((_, rest)) => rest.split_once('#').map_or(rest, |(w, _)| w),
        None => name,
    })
}

/// Copies a `mul_mat`'s F32 input (`src[1]`) into `out` as contiguous rows
/// of `ne[0]`, from host memory or through the backend. `None` for inputs
/// of another type or layout.
fn mul_mat_input(t: &sys::ggml_tensor, staging: &mut Vec<u8>, out: &mut Vec<f32>) -> Option<usize> {
    // SAFETY: as in `mul_mat_weight`.
    let x = unsafe { t.src[1].as_ref() }?;
    if x.type_ != sys::GGML_TYPE_F32 || x.nb[0] != 4 || x.data.is_null() {
        return None;
    }
    let row_len = x.ne[0] as usize;
    // SAFETY: a valid tensor.
    let n_bytes = unsafe { sys::ggml_nbytes(x) };
    let on_host = x.buffer.is_null() || unsafe { sys::ggml_backend_buffer_is_host(x.buffer) };
    let bytes: &[u8] = if on_host {
        // SAFETY: a host tensor spans ggml_nbytes bytes from data.
        unsafe { std::slice::from_raw_parts(x.data as *const u8, n_bytes) }
    } else {
        staging.resize(n_bytes, 0);
        // SAFETY: staging holds the tensor's ggml_nbytes bytes.
        unsafe { sys::ggml_backend_tensor_get(x, staging.as_mut_ptr().cast(), 0, n_bytes) };
        staging
    };
    out.clear();
    for i3 in 0..x.ne[3] as usize {
        for i2 in 0..x.ne[2] as usize {
            for i1 in 0..x.ne[1] as usize {
                let at = i1 * x.nb[1] + i2 * x.nb[2] + i3 * x.nb[3];
                let row = bytes.get(at..at + 4 * row_len)?;
                out.extend(
                    row.chunks_exact(4)
                        .map(|b| f32::from_ne_bytes(b.try_into().expect("4 bytes"))),
                );
            }
        }
    }
    Some(row_len)
}

/// What the eval callback reaches through its user-data pointer.
struct HookSlot {
    hook: Option<*mut (dyn ResidualHook + 'static)>,
    panicked: bool,
    scratch: Vec<f32>,
    /// A device tensor's bytes, for `mul_mat` inputs.
    staging: Vec<u8>,
}

unsafe extern "C" fn eval_callback(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user_data: *mut c_void,
) -> bool {
    // SAFETY: user_data is the Box<HookSlot> owned by the Context, alive
    // for the context's lifetime; callbacks run on the decoding thread.
    let slot = unsafe { &mut *(user_data as *mut HookSlot) };
    let Some(hook) = slot.hook else { return !ask };
    if slot.panicked {
        return !ask;
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: ggml passes a valid tensor.
        let t = unsafe { &mut *t };
        // SAFETY: the hook outlives the decode call that installed it.
        let hook = unsafe { &mut *hook };
        let weight = mul_mat_weight(t).filter(|w| hook.wants_input(w));
        let node = Node::of(t);
        if ask {
            return weight.is_some() || node.is_some_and(|n| hook.wants(n));
        }
        if let Some(w) = weight {
            if t.flags & sys::GGML_TENSOR_FLAG_COMPUTE as i32 != 0 {
                let mut rows = std::mem::take(&mut slot.scratch);
                if let Some(row_len) = mul_mat_input(t, &mut slot.staging, &mut rows) {
                    hook.visit_input(w, &rows, row_len);
                }
                slot.scratch = rows;
            }
        }
        // A node asked for only for its input is not the hook's to visit.
        let Some(node) = node.filter(|&n| weight.is_none() || hook.wants(n)) else {
            return true;
        };
        if t.flags & sys::GGML_TENSOR_FLAG_COMPUTE as i32 == 0 || t.type_ != sys::GGML_TYPE_F32 {
            return true;
        }
        let n_embd = t.ne[0] as usize;
        let n = (t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]) as usize;
        let contiguous = t.nb[0] == 4 && t.nb[1] == 4 * n_embd;
        if !contiguous || t.data.is_null() {
            return true;
        }
        // SAFETY: buffer belongs to the tensor.
        let on_host = t.buffer.is_null() || unsafe { sys::ggml_backend_buffer_is_host(t.buffer) };
        if on_host {
            // SAFETY: contiguous F32 host tensor of n elements.
            let rows = unsafe { std::slice::from_raw_parts_mut(t.data as *mut f32, n) };
            hook.visit(node, rows, n_embd);
        } else {
            slot.scratch.resize(n, 0.0);
            // SAFETY: device tensor of n F32 elements; scratch holds n.
            unsafe { sys::ggml_backend_tensor_get(t, slot.scratch.as_mut_ptr().cast(), 0, n * 4) };
            if hook.visit(node, &mut slot.scratch, n_embd) {
                // SAFETY: as above.
                unsafe { sys::ggml_backend_tensor_set(t, slot.scratch.as_ptr().cast(), 0, n * 4) };
            }
        }
        true
    }));
    result.unwrap_or_else(|_| {
        slot.panicked = true;
        !ask
    })
}

/// Rows, sequences and decodes of every context in this process so far,
/// for the cost account.
#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeCount {
    pub rows: u64,
    /// Of the rows, those that were generated tokens fed back one per
    /// sequence (the rest are prompt rows, decoded many to a sequence).
    pub generated: u64,
    pub sequences: u64,
    pub decodes: u64,
}

static DECODED_ROWS: AtomicU64 = AtomicU64::new(0);
static GENERATED_ROWS: AtomicU64 = AtomicU64::new(0);
static BEGUN_SEQUENCES: AtomicU64 = AtomicU64::new(0);
static DECODES: AtomicU64 = AtomicU64::new(0);

pub fn decode_count() -> DecodeCount {
    DecodeCount {
        rows: DECODED_ROWS.load(Ordering::Relaxed),
        generated: GENERATED_ROWS.load(Ordering::Relaxed),
        sequences: BEGUN_SEQUENCES.load(Ordering::Relaxed),
        decodes: DECODES.load(Ordering::Relaxed),
    }
}

/// Counts `rows` of the last decode as generated tokens.
pub fn count_generated(rows: usize) {
    GENERATED_ROWS.fetch_add(rows as u64, Ordering::Relaxed);
}

#[derive(Clone, Copy, Debug)]
pub struct ContextOptions {
    /// Total KV cells, shared by all sequences.
    pub n_ctx: u32,
    /// Tokens per decode; one ubatch, so hook rows follow batch order.
    pub n_batch: u32,
    pub n_seq: u32,
    pub threads: i32,
    /// Install the eval callback that hooks run in. Off only for baselines:
    /// ggml's scheduler asks the callback about every node once it is set.
    pub eval_callback: bool,
}

/// A decoding context with a residual-stream hook point.
pub struct Context<'m> {
    ptr: NonNull<sys::llama_context>,
    model: &'m Model,
    slot: Box<HookSlot>,
    opts: ContextOptions,
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the context.
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

impl<'m> Context<'m> {
    pub fn new(model: &'m Model, opts: ContextOptions) -> Result<Context<'m>> {
        let mut slot = Box::new(HookSlot {
            hook: None,
            panicked: false,
            scratch: Vec::new(),
            staging: Vec::new(),
        });
        // SAFETY: default params; the callback's user data is the boxed slot,
        // whose address is stable for the life of the context.
        let ptr = unsafe {
            let mut p = sys::llama_context_default_params();
            p.n_ctx = opts.n_ctx;
            p.n_batch = opts.n_batch;
            p.n_ubatch = opts.n_batch;
            p.n_seq_max = opts.n_seq;
            p.n_threads = opts.threads;
            p.n_threads_batch = opts.threads;
            // Unified KV keeps a multi-sequence batch in one ubatch in order.
            p.kv_unified = true;
            p.no_perf = true;
            if opts.eval_callback {
                p.cb_eval = Some(eval_callback);
                p.cb_eval_user_data = (&mut *slot as *mut HookSlot).cast();
            }
            sys::llama_init_from_model(model.ptr.as_ptr(), p)
        };
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| anyhow!("llama.cpp could not create a context ({opts:?})"))?;
        Ok(Context {
            ptr,
            model,
            slot,
            opts,
        })
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    pub fn options(&self) -> ContextOptions {
        self.opts
    }

    /// Forgets every sequence. Only the cells' metadata is reset: attention
    /// masks out every empty cell, so zeroing the buffers would cost a
    /// pass over the whole KV cache for nothing.
    pub fn clear(&mut self) {
        // SAFETY: valid context.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ptr.as_ptr()), false) }
    }

    /// Removes one sequence's cached tokens.
    pub fn clear_seq(&mut self, seq: i32) {
        // SAFETY: valid context.
        unsafe { sys::llama_memory_seq_rm(sys::llama_get_memory(self.ptr.as_ptr()), seq, -1, -1) };
    }

    /// Decodes a batch with no hook.
    pub fn decode(&mut self, batch: &Batch) -> Result<()> {
        self.decode_inner(batch, None)
    }

    /// Decodes a batch while `hook` sees (and may rewrite) the residual stream.
    pub fn decode_with(&mut self, batch: &Batch, hook: &mut dyn ResidualHook) -> Result<()> {
        if !self.opts.eval_callback {
            bail!("internal error: a hook needs a context with the eval callback");
        }
        // SAFETY (lifetime erasure): the pointer is cleared before returning,
        // so the callback never sees the hook after this borrow ends.
        let hook: *mut (dyn ResidualHook + '_) = hook;
        let hook: *mut (dyn ResidualHook + 'static) = unsafe { std::mem::transmute(hook) };
        self.decode_inner(batch, Some(hook))
    }

    fn decode_inner(
        &mut self,
        batch: &Batch,
        hook: Option<*mut (dyn ResidualHook + 'static)>,
    ) -> Result<()> {
        if batch.raw.n_tokens == 0 {
            return Ok(());
        }
        if batch.raw.n_tokens as u32 > self.opts.n_batch {
            bail!(
                "batch of {} tokens exceeds n_batch {}",
                batch.raw.n_tokens,
                self.opts.n_batch
            );
        }
        self.slot.hook = hook;
        self.slot.panicked = false;
        // SAFETY: valid context and batch.
        let rc = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch.raw) };
        self.slot.hook = None;
        if self.slot.panicked {
            bail!("internal error: the activation hook panicked during decode");
        }
        match rc {
            0 => {
                DECODED_ROWS.fetch_add(batch.len() as u64, Ordering::Relaxed);
                BEGUN_SEQUENCES.fetch_add(batch.sequences_begun(), Ordering::Relaxed);
                DECODES.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            1 => bail!("llama_decode: no KV slot for the batch (context too small)"),
            rc => bail!("llama_decode failed with code {rc}"),
        }
    }

    /// Logits of batch token `i`, which must have been marked as an output.
    pub fn logits(&self, i: usize) -> Result<&[f32]> {
        // SAFETY: llama.cpp returns null for a non-output index.
        let p = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), i as i32) };
        if p.is_null() {
            bail!("no logits for batch token {i}");
        }
        // SAFETY: n_vocab floats owned by the context until the next decode.
        Ok(unsafe { std::slice::from_raw_parts(p, self.model.n_vocab()) })
    }

    /// Sets llama.cpp's own control vector: `data` holds layers 1..n_layer
    /// (llama.cpp has no slot for layer 0), added to `l_out-N`.
    pub fn set_control_vector(
        &mut self,
        data: Option<&[f32]>,
        n_embd: usize,
        layers: (i32, i32),
    ) -> Result<()> {
        let (ptr, len) = data.map_or((std::ptr::null(), 0), |d| (d.as_ptr(), d.len()));
        // SAFETY: data (when given) is len floats.
        let rc = unsafe {
            sys::llama_set_adapter_cvec(
                self.ptr.as_ptr(),
                ptr,
                len,
                n_embd as i32,
                layers.0,
                layers.1,
            )
        };
        if rc != 0 {
            bail!("llama.cpp rejected the control vector");
        }
        Ok(())
    }
}

/// A token batch for `Context::decode`.
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
    max_seqs: usize,
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_init.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

impl Batch {
    /// Room for `capacity` tokens, each in up to `max_seqs` sequences.
    pub fn new(capacity: usize, max_seqs: usize) -> Batch {
        let max_seqs = max_seqs.max(1);
        // SAFETY: allocates token/pos/logit arrays for `capacity` tokens
        // and a seq-id array of `max_seqs` for each.
        let raw = unsafe { sys::llama_batch_init(capacity as i32, 0, max_seqs as i32) };
        Batch {
            raw,
            capacity,
            max_seqs,
        }
    }

    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.raw.n_tokens == 0
    }

    /// Sequences whose first token (position 0) this batch holds.
    fn sequences_begun(&self) -> u64 {
        (0..self.len())
            .map(|i| {
                // SAFETY: i < n_tokens ≤ capacity, which the arrays hold.
                let (pos, n) = unsafe { (*self.raw.pos.add(i), *self.raw.n_seq_id.add(i)) };
                if pos == 0 {
                    n as u64
                } else {
                    0
                }
            })
            .sum()
    }

    pub fn free_space(&self) -> usize {
        self.capacity - self.len()
    }

    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    /// Appends a token; returns its batch index.
    pub fn push(&mut self, token: i32, pos: usize, seq: i32, output: bool) -> usize {
        let i = self.len();
        assert!(i < self.capacity, "batch overflow");
        // SAFETY: i < capacity; arrays were sized by llama_batch_init.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos as i32;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq;
            *self.raw.logits.add(i) = output as i8;
        }
        self.raw.n_tokens += 1;
        i
    }

    /// Appends a token that sequences `0..n_seqs` share (a common prompt
    /// prefix: one KV cell that all of them attend to), without output.
    pub fn push_shared(&mut self, token: i32, pos: usize, n_seqs: usize) -> usize {
        let i = self.len();
        assert!(i < self.capacity, "batch overflow");
        assert!(
            (1..=self.max_seqs).contains(&n_seqs),
            "{n_seqs} sequences per token"
        );
        // SAFETY: i < capacity and n_seqs ≤ the max_seqs each seq-id array holds.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos as i32;
            *self.raw.n_seq_id.add(i) = n_seqs as i32;
            let ids = *self.raw.seq_id.add(i);
            for k in 0..n_seqs {
                *ids.add(k) = k as i32;
            }
            *self.raw.logits.add(i) = 0;
        }
        self.raw.n_tokens += 1;
        i
    }
}

/// Reads a control-vector GGUF with llama.cpp's own gguf reader, the way
/// `common_control_vector_load` does: `(layer, vector)` for each
/// `direction.N` tensor, with N ≥ 1 and F32 data.
pub fn read_control_vector(path: &Path) -> Result<Vec<(usize, Vec<f32>)>> {
    let cpath = CString::new(path.to_string_lossy().as_bytes()).context("path contains NUL")?;
    let mut ggml_ctx: *mut sys::ggml_context = std::ptr::null_mut();
    // SAFETY: gguf allocates a ggml context holding the tensors' data.
    let gguf = unsafe {
        sys::gguf_init_from_file(
            cpath.as_ptr(),
            sys::gguf_init_params {
                no_alloc: false,
                ctx: &mut ggml_ctx,
            },
        )
    };
    if gguf.is_null() || ggml_ctx.is_null() {
        bail!("llama.cpp cannot read {} as GGUF", path.display());
    }
    let mut out = Vec::new();
    let mut result = Ok(());
    // SAFETY: valid contexts until freed below; names are NUL-terminated.
    unsafe {
        for i in 0..sys::gguf_get_n_tensors(gguf) {
            let name_ptr = sys::gguf_get_tensor_name(gguf, i);
            let name = CStr::from_ptr(name_ptr).to_string_lossy().into_owned();
            let layer = name
                .strip_prefix("direction.")
                .and_then(|n| n.parse::<usize>().ok());
            let t = sys::ggml_get_tensor(ggml_ctx, name_ptr);
            match layer {
                Some(layer) if layer >= 1 && !t.is_null() && (*t).type_ == sys::GGML_TYPE_F32 => {
                    let n = (*t).ne[0] as usize;
                    out.push((
                        layer,
                        std::slice::from_raw_parts((*t).data as *const f32, n).to_vec(),
                    ));
                }
                _ => {
                    result = Err(anyhow!(
                        "{}: tensor {name} is not a valid direction.N (N >= 1, F32)",
                        path.display()
                    ));
                    break;
                }
            }
        }
        sys::gguf_free(gguf);
        sys::ggml_free(ggml_ctx);
    }
    result.map(|_| out)
}
