//! Running token sequences through llama.cpp in packed batches, with
//! optional residual-stream interventions: the measuring instrument that
//! capture, direction selection and verification share.

use crate::edit::{self, Component, EditWeights};
use crate::ffi::{Batch, Context, ContextOptions, Model, Node, ResidualHook};
use anyhow::{bail, Result};

/// One prompt's place in the current batch.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// Index into the caller's prompt list.
    pub prompt: usize,
    /// Batch row of its first token.
    pub start: usize,
    pub len: usize,
}

impl Entry {
    /// Batch row of its last token, whose logits are kept.
    pub fn last(&self) -> usize {
        self.start + self.len - 1
    }
}

/// A residual hook that also learns each batch's layout before it runs.
pub trait BatchHook: ResidualHook {
    fn begin(&mut self, _entries: &[Entry]) {}
}

/// Observes nothing.
pub struct NoHook;

impl ResidualHook for NoHook {
    fn wants(&mut self, _: Node) -> bool {
        false
    }
    fn visit(&mut self, _: Node, _: &mut [f32], _: usize) -> bool {
        false
    }
}
impl BatchHook for NoHook {}

/// Projects a unit direction (or a subspace: it and `further` directions)
/// out of every residual-stream node at every position: the run-time
/// equivalent of the weight edit.
///
/// With `scale` s < 1 the weight edit removes a share s of each *write*
/// (`w − s (w·u) u`), not of the accumulated residual, which compounding
/// per-node projections would over-remove. So each row's component is
/// tracked from node to node: a node's new write along u is what its
/// component gained since the previous node, and only (1 − s) of that gain
/// is kept. A subspace is handled direction by direction over an
/// orthonormal basis, which is exact: the components do not interact.
///
/// `embeddings` mirrors editing `token_embd`: its rows lose their
/// component on the way in, and with tied embeddings (`unembedding`) the
/// logits are those of `E' h = E (h − s u uᵀh)`, i.e. the final normalised
/// state loses a share s of its component.
///
/// `weights` give each writer its own share (`scale × weight`), as
/// `apply` does per tensor: a mid-layer node carries layer N's attention
/// write, a layer output its MLP write.
pub struct AblateHook {
    pub direction: Vec<f32>,
    /// Share of each write's component removed, as `apply --scale`.
    pub scale: f32,
    pub weights: EditWeights,
    pub embeddings: bool,
    pub unembedding: bool,
    /// Further directions (unit), as given: each writer's basis is built
    /// from its own refusal direction and these, as `apply` plans it.
    further: Vec<Vec<f32>>,
    /// `further` orthonormalized against `direction`: with it, the basis of
    /// the residual nodes and the embeddings.
    further_global: Vec<Vec<f32>>,
    /// Component along each basis direction of each batch row after the
    /// previous node (row-major: a row's components together).
    carried: Vec<f32>,
    /// Batch rows that produce outputs (the rows of a last-layer node).
    output_rows: Vec<usize>,
    /// The orthonormal basis removed from a projection's output (before
    /// any post-norm), keyed by `Node::AttnProj(l)` / `Node::FfnProj(l)`:
    /// for post-norm families (`with_post_norms`) and per-layer directions
    /// (`with_layer_directions`). Other writes are ablated on the residual.
    pre_norm: Vec<(Node, Vec<Vec<f32>>)>,
}

impl AblateHook {
    /// Full removal, embeddings included (untied).
    pub fn new(direction: &[f32]) -> Option<AblateHook> {
        edit::normalized(direction).map(|direction| AblateHook {
            direction,
            scale: 1.0,
            weights: EditWeights::default(),
            embeddings: true,
            unembedding: false,
            further: Vec::new(),
            further_global: Vec::new(),
            carried: Vec::new(),
            output_rows: Vec::new(),
            pre_norm: Vec::new(),
        })
    }

    /// A subspace: `further` directions are removed with the refusal
    /// direction, from every writer. Call before `with_post_norms` and
    /// `with_layer_directions`, which build each writer's basis from them.
    pub fn with_further(mut self, further: &[Vec<f32>]) -> Option<AblateHook> {
        self.further = further
            .iter()
            .map(|d| edit::normalized(d))
            .collect::<Option<_>>()?;
        let basis = edit::writer_basis(&self.direction, &self.further, None)?;
        self.further_global = basis[1..].to_vec();
        Some(self)
    }

    /// Directions in the subspace removed.
    pub fn subspace_dim(&self) -> usize {
        1 + self.further_global.len()
    }

    /// The basis the residual nodes and the embeddings lose.
    fn global_basis(&self) -> impl Iterator<Item = &[f32]> {
        std::iter::once(self.direction.as_slice())
            .chain(self.further_global.iter().map(Vec::as_slice))
    }

    /// For a post-norm family, the weight edit removes `g ⊙ r` from a
    /// projection's output before the post-norm `g ⊙ x / rms(x)`, which then
    /// rescales the whole write. Removing `r` from the residual afterwards
    /// is a different operation; so the hook acts where the edit does, on
    /// the projection's output, and the residual nodes of those layers
    /// only carry the component along.
    pub fn with_post_norms(mut self, norms: &edit::PostNorms) -> AblateHook {
        self.pre_norm = norms
            .weights
            .iter()
            .filter_map(|(layer, proj, g)| {
                let node = match proj {
                    edit::Projection::Attention => Node::AttnProj(*layer),
                    edit::Projection::Mlp => Node::FfnProj(*layer),
                };
                edit::writer_basis(&self.direction, &self.further, Some(g)).map(|b| (node, b))
            })
            .collect();
        self
    }

    /// Per-layer scope: layer ℓ's writers lose `directions[ℓ]` (unit
    /// vectors), each on its projection's output as the weight edit does;
    /// `direction` stays the one `token_embd` (and a tied unembedding) loses.
    /// Biases added after the projection are not ablated here, so this
    /// emulates `apply` exactly only for models without writer biases.
    pub fn with_layer_directions(
        mut self,
        directions: &[Vec<f32>],
        norms: &edit::PostNorms,
    ) -> AblateHook {
        if directions.is_empty() {
            return self;
        }
        let post_norm = |layer: usize, proj: edit::Projection| {
            norms
                .weights
                .iter()
                .find(|(l, p, _)| *l == layer && *p == proj)
                .map(|(_, _, g)| g.as_slice())
        };
        self.pre_norm.clear();
        for (layer, r) in directions.iter().enumerate() {
            for (proj, node) in [
                (edit::Projection::Attention, Node::AttnProj(layer)),
                (edit::Projection::Mlp, Node::FfnProj(layer)),
            ] {
                let basis = match post_norm(layer, proj) {
                    Some(g) => edit::writer_basis(r, &self.further, Some(g)),
                    None => edit::normalized(r)
                        .and_then(|r| edit::writer_basis(&r, &self.further, None)),
                };
                if let Some(basis) = basis {
                    self.pre_norm.push((node, basis));
                }
            }
        }
        self
    }

    fn pre_norm_basis(&self, node: Node) -> Option<&[Vec<f32>]> {
        self.pre_norm
            .iter()
            .find(|(n, _)| *n == node)
            .map(|(_, b)| b.as_slice())
    }
}

impl AblateHook {
    /// Share of the token embeddings' component removed.
    fn embedding_share(&self) -> f32 {
        if self.embeddings {
            self.scale * self.weights.embeddings
        } else {
            0.0
        }
    }
}

impl ResidualHook for AblateHook {
    fn wants(&mut self, node: Node) -> bool {
        match node {
            Node::FinalNorm => self.unembedding,
            Node::AttnProj(_) | Node::FfnProj(_) => self.pre_norm_basis(node).is_some(),
            _ => true,
        }
    }
    fn visit(&mut self, node: Node, rows: &mut [f32], n_embd: usize) -> bool {
        if n_embd != self.direction.len() {
            return false;
        }
        let n_rows = rows.len() / n_embd;
        if let Node::AttnProj(_) | Node::FfnProj(_) = node {
            // A fresh write, row for row: no component to carry.
            let share = match node {
                Node::AttnProj(l) => self.scale * self.weights.weight(Component::Attention(l)),
                Node::FfnProj(l) => self.scale * self.weights.weight(Component::Mlp(l)),
                _ => unreachable!("matched above"),
            };
            return match self.pre_norm_basis(node) {
                Some(basis) => {
                    for u in basis {
                        edit::orthogonalize_rows_seq(rows, u, share);
                    }
                    true
                }
                None => false,
            };
        }
        if node == Node::FinalNorm {
            let share = self.embedding_share();
            for u in self.global_basis() {
                edit::orthogonalize_rows_seq(rows, u, share);
            }
            return true;
        }
        // Scaling the embeddings writes nothing new: its component is just
        // carried; so does a post-normed write, already ablated before its norm.
        let keep_here = match node {
            Node::Embeddings => 1.0 - self.embedding_share(),
            Node::ScaledEmbeddings => 1.0,
            Node::MidLayer(l) if self.pre_norm_basis(Node::AttnProj(l)).is_some() => 1.0,
            Node::LayerOut(l) if self.pre_norm_basis(Node::FfnProj(l)).is_some() => 1.0,
            Node::MidLayer(l) => 1.0 - self.scale * self.weights.weight(Component::Attention(l)),
            Node::LayerOut(l) => 1.0 - self.scale * self.weights.weight(Component::Mlp(l)),
            Node::FinalNorm | Node::AttnProj(_) | Node::FfnProj(_) => unreachable!("handled above"),
        };
        let k = self.subspace_dim();
        // The fields apart, so that the basis is read while `carried` is
        // written, without copying it on every node.
        let AblateHook {
            direction,
            further_global,
            carried,
            output_rows,
            ..
        } = self;
        let basis =
            std::iter::once(direction.as_slice()).chain(further_global.iter().map(Vec::as_slice));
        let n_carried = carried.len() / k;
        for (i, row) in rows.chunks_exact_mut(n_embd).enumerate() {
            // Last-layer nodes hold only the output rows, in batch order.
            let batch_row = if n_rows == n_carried {
                i
            } else {
                output_rows.get(i).copied().unwrap_or(i)
            };
            for (a, u) in basis.clone().enumerate() {
                let slot = batch_row * k + a;
                let before = match node {
                    Node::Embeddings | Node::ScaledEmbeddings => 0.0,
                    _ => carried.get(slot).copied().unwrap_or(0.0),
                };
                let now = edit::dot(row, u) as f32;
                let target = before + keep_here * (now - before);
                let delta = target - now;
                row.iter_mut().zip(u).for_each(|(x, ui)| *x += delta * ui);
                if let Some(c) = carried.get_mut(slot) {
                    *c = target;
                }
            }
        }
        true
    }
}

impl BatchHook for AblateHook {
    fn begin(&mut self, entries: &[Entry]) {
        self.output_rows = entries.iter().map(Entry::last).collect();
        let n_tokens = entries.last().map_or(0, |e| e.start + e.len);
        self.carried = vec![0.0; n_tokens * self.subspace_dim()];
    }
}

/// Adds a vector to the output of one layer at every position.
pub struct AddHook {
    pub layer: usize,
    pub vector: Vec<f32>,
}

impl ResidualHook for AddHook {
    fn wants(&mut self, node: Node) -> bool {
        node == Node::LayerOut(self.layer)
    }
    fn visit(&mut self, _: Node, rows: &mut [f32], n_embd: usize) -> bool {
        if n_embd != self.vector.len() {
            return false;
        }
        for row in rows.chunks_exact_mut(n_embd) {
            row.iter_mut().zip(&self.vector).for_each(|(x, v)| *x += v);
        }
        true
    }
}
impl BatchHook for AddHook {}

/// A context sized for packed prompt batches.
pub struct Runner<'m> {
    pub ctx: Context<'m>,
    batch: Batch,
}

impl<'m> Runner<'m> {
    /// `n_batch` tokens per decode (also the longest prompt accepted).
    pub fn new(model: &'m Model, n_batch: usize, threads: i32) -> Result<Runner<'m>> {
        Runner::with_callback(model, n_batch, n_batch, threads, true)
    }

    /// A runner with no eval callback installed: a plain llama.cpp decode,
    /// for baselines. Only [`NoHook`] may be passed to it.
    pub fn plain(model: &'m Model, n_batch: usize, threads: i32) -> Result<Runner<'m>> {
        Runner::with_callback(model, n_batch, n_batch, threads, false)
    }

    /// A plain runner whose KV cache holds `cells` tokens, more than one
    /// decode's `n_batch`: generation then runs more sequences side by
    /// side, and each step's pass over the weights serves more replies.
    pub fn plain_with_cells(
        model: &'m Model,
        n_batch: usize,
        cells: usize,
        threads: i32,
    ) -> Result<Runner<'m>> {
        Runner::with_callback(model, n_batch, cells, threads, false)
    }

    fn with_callback(
        model: &'m Model,
        n_batch: usize,
        cells: usize,
        threads: i32,
        eval_callback: bool,
    ) -> Result<Runner<'m>> {
        let n_batch = n_batch.min(model.n_ctx_train().max(512));
        // llama.cpp sizes its output buffer for at least n_seq outputs, which must fit in n_batch.
        let n_seq = n_batch.min(64) as u32;
        let opts = ContextOptions {
            n_ctx: cells.max(n_batch) as u32,
            n_batch: n_batch as u32,
            n_seq,
            threads,
            eval_callback,
        };
        Ok(Runner {
            ctx: Context::new(model, opts)?,
            batch: Batch::new(n_batch, n_seq as usize),
        })
    }

    /// Decodes the current batch; a plain runner has no callback to hook.
    fn decode(&mut self, hook: &mut dyn BatchHook) -> Result<()> {
        if self.ctx.options().eval_callback {
            self.ctx.decode_with(&self.batch, hook)
        } else {
            self.ctx.decode(&self.batch)
        }
    }

    pub fn max_tokens(&self) -> usize {
        self.ctx.options().n_batch as usize
    }

    /// Decodes `prompts` packed into as few batches as the context allows,
    /// each prompt in its own sequence, and hands each batch's layout to
    /// `hook.begin` before and to `read` after its decode. Every token of
    /// every prompt is its own batch row (what a capture of inputs counts).
    pub fn run(
        &mut self,
        prompts: &[Vec<i32>],
        hook: &mut dyn BatchHook,
        read: impl FnMut(&Context, &[Entry]) -> Result<()>,
    ) -> Result<()> {
        self.run_packed(prompts, hook, read, false)
    }

    /// `run`, with the prefix a batch's prompts share (a chat template's
    /// system prompt) decoded once for all of them: fewer rows, the same
    /// sequences. Entries then cover each prompt's own tokens only.
    fn run_packed(
        &mut self,
        prompts: &[Vec<i32>],
        hook: &mut dyn BatchHook,
        mut read: impl FnMut(&Context, &[Entry]) -> Result<()>,
        share_prefix: bool,
    ) -> Result<()> {
        let max = self.max_tokens();
        let n_seq = self.ctx.options().n_seq as usize;
        if let Some((i, p)) = prompts
            .iter()
            .enumerate()
            .find(|(_, p)| p.len() > max || p.is_empty())
        {
            bail!(
                "prompt {i} has {} tokens; the context holds {max} (use a shorter prompt)",
                p.len()
            );
        }
        let mut next = 0;
        let mut entries = Vec::new();
        while next < prompts.len() {
            // A group that fits the batch even unshared.
            let (first, mut used) = (next, 0);
            while next < prompts.len()
                && next - first < n_seq
                && used + prompts[next].len() <= self.max_tokens()
            {
                used += prompts[next].len();
                next += 1;
            }
            let group = &prompts[first..next];
            let shared = if share_prefix {
                shared_prefix(group)
            } else {
                0
            };
            self.batch.clear();
            entries.clear();
            self.push_group(group, shared, &mut entries);
            for e in &mut entries {
                e.prompt += first;
            }
            self.ctx.clear();
            hook.begin(&entries);
            self.decode(hook)?;
            read(&self.ctx, &entries)?;
        }
        self.ctx.clear();
        Ok(())
    }

    /// Pushes `group`'s prompts as sequences 0.., the first `shared`
    /// tokens (common to all of them) once, and records each prompt's own
    /// rows in `entries` (prompt indices relative to the group).
    fn push_group(&mut self, group: &[Vec<i32>], shared: usize, entries: &mut Vec<Entry>) {
        if let Some(p) = group.first() {
            for (pos, &tok) in p[..shared].iter().enumerate() {
                self.batch.push_shared(tok, pos, group.len());
            }
        }
        for (seq, p) in group.iter().enumerate() {
            let start = self.batch.len();
            for (pos, &tok) in p.iter().enumerate().skip(shared) {
                self.batch.push(tok, pos, seq as i32, pos + 1 == p.len());
            }
            entries.push(Entry {
                prompt: seq,
                start,
                len: p.len() - shared,
            });
        }
    }

    /// Log-probabilities of the first generated token for each prompt.
    pub fn first_token_logprobs(
        &mut self,
        prompts: &[Vec<i32>],
        hook: &mut dyn BatchHook,
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = vec![Vec::new(); prompts.len()];
        self.run_packed(
            prompts,
            hook,
            |ctx, entries| {
                for e in entries {
                    out[e.prompt] = log_softmax(ctx.logits(e.last())?);
                }
                Ok(())
            },
            true,
        )?;
        Ok(out)
    }
}

pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    logits.iter().map(|&x| (x as f64 - log_z) as f32).collect()
}

/// KL(p ‖ q) for log-probability vectors.
pub fn kl_divergence(log_p: &[f32], log_q: &[f32]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| {
            let p = (lp as f64).exp();
            if p > 0.0 {
                p * (lp as f64 - lq as f64)
            } else {
                0.0
            }
        })
        .sum::<f64>()
        .max(0.0)
}

/// What greedy generation produced for one prompt.
#[derive(Clone, Debug, Default)]
pub struct Generation {
    pub tokens: Vec<i32>,
    /// Log-probabilities of the first generated token.
    pub first_log_probs: Vec<f32>,
}

impl<'m> Runner<'m> {
    /// Greedy generation of up to `n_gen` tokens per prompt (stopping at an
    /// end-of-generation token), many prompts at once, one sequence each.
    pub fn generate(
        &mut self,
        prompts: &[Vec<i32>],
        n_gen: usize,
        hook: &mut dyn BatchHook,
    ) -> Result<Vec<Generation>> {
        self.generate_until(prompts, n_gen, hook, &|_| false)
    }

    /// `generate`, ending a reply early once `done` holds for its tokens
    /// (a judge whose verdict can no longer change needs no more of it).
    pub fn generate_until(
        &mut self,
        prompts: &[Vec<i32>],
        n_gen: usize,
        hook: &mut dyn BatchHook,
        done: &dyn Fn(&[i32]) -> bool,
    ) -> Result<Vec<Generation>> {
        let model = self.ctx.model();
        let (budget, max_prefill) = (self.ctx.options().n_ctx as usize, self.max_tokens());
        let n_seq = self.ctx.options().n_seq as usize;
        let mut out = vec![Generation::default(); prompts.len()];
        let mut next = 0;
        while next < prompts.len() {
            // A group whose prompts and generations all fit in the KV cache.
            let (mut group, mut used, mut prefill) = (Vec::new(), 0, 0);
            while next < prompts.len()
                && group.len() < n_seq
                && used + prompts[next].len() + n_gen <= budget
                && prefill + prompts[next].len() <= max_prefill
            {
                used += prompts[next].len() + n_gen;
                prefill += prompts[next].len();
                group.push(next);
                next += 1;
            }
            if group.is_empty() {
                let len = prompts[next].len();
                if len > max_prefill {
                    bail!("prompt {next} has {len} tokens; the context holds {max_prefill} in one decode (use a shorter prompt)");
                }
                bail!("prompt {next} has {len} tokens; the context holds {budget} with {n_gen} to generate (use a shorter prompt)");
            }
            // Prefill: the group's prompts fit one batch.
            self.ctx.clear();
            self.batch.clear();
            // The group's prompts are consecutive.
            let texts = &prompts[group[0]..group[0] + group.len()];
            let mut entries = Vec::new();
            self.push_group(texts, shared_prefix(texts), &mut entries);
            let last_row: Vec<usize> = entries.iter().map(Entry::last).collect();
            for e in &mut entries {
                e.prompt = group[e.prompt];
            }
            hook.begin(&entries);
            self.decode(hook)?;
            let mut logits: Vec<Vec<f32>> = last_row
                .iter()
                .map(|&row| self.ctx.logits(row).map(<[f32]>::to_vec))
                .collect::<Result<_>>()?;
            let mut active: Vec<usize> = (0..group.len()).collect();
            for step in 0..n_gen {
                self.batch.clear();
                let mut still = Vec::new();
                let mut step_entries = Vec::new();
                for &seq in &active {
                    let p = group[seq];
                    if step == 0 {
                        out[p].first_log_probs = log_softmax(&logits[seq]);
                    }
                    let tok = argmax(&logits[seq]);
                    if model.is_eog(tok) {
                        continue;
                    }
                    out[p].tokens.push(tok);
                    if step + 1 == n_gen || done(&out[p].tokens) {
                        continue;
                    }
                    let row = self
                        .batch
                        .push(tok, prompts[p].len() + step, seq as i32, true);
                    step_entries.push(Entry {
                        prompt: p,
                        start: row,
                        len: 1,
                    });
                    still.push((seq, row));
                }
                if still.is_empty() {
                    break;
                }
                hook.begin(&step_entries);
                self.decode(hook)?;
                crate::ffi::count_generated(still.len());
                for &(seq, row) in &still {
                    logits[seq] = self.ctx.logits(row)?.to_vec();
                }
                active = still.into_iter().map(|(seq, _)| seq).collect();
            }
        }
        self.ctx.clear();
        Ok(out)
    }
}

/// Tokens every prompt of `group` begins with, leaving each at least one
/// of its own (whose logits are read); 0 for a single prompt, which has
/// nothing to share.
pub fn shared_prefix(group: &[Vec<i32>]) -> usize {
    let Some((first, rest)) = group.split_first() else {
        return 0;
    };
    if rest.is_empty() {
        return 0;
    }
    let shortest = group.iter().map(Vec::len).min().unwrap_or(0);
    let common = rest.iter().fold(first.len(), |n, p| {
        first[..n].iter().zip(p).take_while(|(a, b)| a == b).count()
    });
    common.min(shortest.saturating_sub(1))
}

/// The likeliest token of a logit or log-probability vector.
pub fn argmax(xs: &[f32]) -> i32 {
    xs.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0 as i32
}

#[cfg(test)]
mod tests {
    use super::shared_prefix;

    #[test]
    fn the_shared_prefix_leaves_every_prompt_a_token_of_its_own() {
        assert_eq!(shared_prefix(&[]), 0);
        assert_eq!(shared_prefix(&[vec![1, 2, 3]]), 0);
        assert_eq!(shared_prefix(&[vec![1, 2, 3], vec![1, 2, 4]]), 2);
        assert_eq!(shared_prefix(&[vec![1, 2, 3], vec![1, 2, 3, 4]]), 2);
        assert_eq!(shared_prefix(&[vec![1, 2], vec![3, 2]]), 0);
        assert_eq!(shared_prefix(&[vec![7], vec![7]]), 0);
    }
}
