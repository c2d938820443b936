//! How strongly each residual writer is edited: the parametrized edit that
//! the run-time hook and `apply` both apply.
//!
//! The share of the direction removed from a tensor is
//! `scale × weight(component, layer)`. Per-layer weights follow heretic's
//! kernel: a peak `max_weight` at a (fractional) layer `max_weight_position`,
//! falling linearly to `min_weight` at `min_weight_distance` layers from it,
//! and 0 beyond. It is kept because it is a small, smooth family (four
//! numbers per component) that an optimizer can search well, and because
//! it contains the paper's uniform edit (a kernel wide enough, flat at 1).

use serde::{Deserialize, Serialize};

/// Heretic's per-layer weight kernel for one component.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    pub max_weight: f32,
    pub max_weight_position: f32,
    pub min_weight: f32,
    pub min_weight_distance: f32,
}

impl Kernel {
    /// The weight at `layer`: linear from the peak to `min_weight` at
    /// `min_weight_distance`, 0 beyond.
    pub fn weight(&self, layer: usize) -> f32 {
        let distance = (layer as f32 - self.max_weight_position).abs();
        if distance > self.min_weight_distance {
            return 0.0;
        }
        let t = if self.min_weight_distance > 0.0 {
            distance / self.min_weight_distance
        } else {
            0.0
        };
        self.max_weight + t * (self.min_weight - self.max_weight)
    }

    fn is_finite(&self) -> bool {
        [
            self.max_weight,
            self.max_weight_position,
            self.min_weight,
            self.min_weight_distance,
        ]
        .iter()
        .all(|x| x.is_finite())
    }
}

/// Which residual writer a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// `token_embd` (and, when tied, the unembedding).
    Embeddings,
    /// `blk.N.attn_output`.
    Attention(usize),
    /// `blk.N.ffn_down*`.
    Mlp(usize),
}

impl Component {
    /// The component of a tensor name that `classify` accepts.
    pub fn of(name: &str) -> Option<Component> {
        if name == "token_embd.weight" {
            return Some(Component::Embeddings);
        }
        let (layer, rest) = name.strip_prefix("blk.")?.split_once('.')?;
        let layer = layer.parse().ok()?;
        if rest.starts_with("attn_output") {
            Some(Component::Attention(layer))
        } else if rest.starts_with("ffn_down") {
            Some(Component::Mlp(layer))
        } else {
            None
        }
    }
}

/// Per-component weights. `None` kernels mean weight 1 at every layer (the
/// paper's uniform edit).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EditWeights {
    pub attention: Option<Kernel>,
    pub mlp: Option<Kernel>,
    /// Weight of `token_embd` (0: left unedited).
    pub embeddings: f32,
}

impl Default for EditWeights {
    fn default() -> Self {
        EditWeights::uniform(true)
    }
}

/// Above this a weight would flip the component's sign by more than it removes.
pub const MAX_WEIGHT: f32 = 2.0;

impl EditWeights {
    /// Every writer at weight 1, `token_embd` included or not.
    pub fn uniform(embeddings: bool) -> EditWeights {
        EditWeights {
            attention: None,
            mlp: None,
            embeddings: if embeddings { 1.0 } else { 0.0 },
        }
    }

    pub fn weight(&self, component: Component) -> f32 {
        match component {
            Component::Embeddings => self.embeddings,
            Component::Attention(l) => self.attention.map_or(1.0, |k| k.weight(l)),
            Component::Mlp(l) => self.mlp.map_or(1.0, |k| k.weight(l)),
        }
    }

    /// Rejects weights no edit should have (non-finite, negative, huge).
    pub fn validate(&self) -> anyhow::Result<()> {
        let kernels = [self.attention, self.mlp];
        let finite = self.embeddings.is_finite() && kernels.iter().flatten().all(Kernel::is_finite);
        if !finite {
            anyhow::bail!("edit weights contain NaN or infinite values");
        }
        let in_range = |w: f32| (0.0..=MAX_WEIGHT).contains(&w);
        let ok = in_range(self.embeddings)
            && kernels.iter().flatten().all(|k| {
                in_range(k.max_weight) && in_range(k.min_weight) && k.min_weight_distance >= 0.0
            });
        if !ok {
            anyhow::bail!("edit weights must lie in [0, {MAX_WEIGHT}] with distances ≥ 0");
        }
        Ok(())
    }

    /// Per-layer weights of (attention, MLP), for the run-time hook.
    pub fn per_layer(&self, n_layer: usize) -> (Vec<f32>, Vec<f32>) {
        (0..n_layer)
            .map(|l| {
                (
                    self.weight(Component::Attention(l)),
                    self.weight(Component::Mlp(l)),
                )
            })
            .unzip()
    }
}

/// One point of the edit space.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EditPoint {
    /// Fractional layer: the direction interpolates between the two
    /// neighbouring layers' (normalized) differences of means.
    pub direction_index: f32,
    pub position: usize,
    /// Orthogonalized against the harmless mean at that layer.
    pub biprojected: bool,
    /// Each layer's writers lose their own layer's direction (heretic's
    /// "per layer" scope); `direction_index` then only picks `token_embd`'s.
    #[serde(default)]
    pub per_layer: bool,
    /// Global share (`apply --scale`); the weights carry the rest.
    pub scale: f32,
    pub weights: EditWeights,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_peaks_falls_linearly_and_stops() {
        let k = Kernel {
            max_weight: 1.2,
            max_weight_position: 10.0,
            min_weight: 0.2,
            min_weight_distance: 4.0,
        };
        assert_eq!(k.weight(10), 1.2);
        assert!((k.weight(12) - 0.7).abs() < 1e-6);
        assert!((k.weight(6) - 0.2).abs() < 1e-6);
        assert_eq!(k.weight(5), 0.0);
        assert_eq!(k.weight(15), 0.0);
    }

    #[test]
    fn components_follow_tensor_names() {
        assert_eq!(
            Component::of("token_embd.weight"),
            Some(Component::Embeddings)
        );
        assert_eq!(
            Component::of("blk.3.attn_output.bias"),
            Some(Component::Attention(3))
        );
        assert_eq!(
            Component::of("blk.7.ffn_down_exps.weight"),
            Some(Component::Mlp(7))
        );
        assert_eq!(Component::of("blk.7.ffn_up.weight"), None);
    }

    #[test]
    fn uniform_is_one_everywhere_and_validation_rejects_nonsense() {
        let w = EditWeights::uniform(false);
        assert_eq!(w.weight(Component::Mlp(40)), 1.0);
        assert_eq!(w.weight(Component::Embeddings), 0.0);
        assert!(w.validate().is_ok());
        let mut bad = w;
        bad.embeddings = f32::NAN;
        assert!(bad.validate().is_err());
        bad.embeddings = -0.5;
        assert!(bad.validate().is_err());
    }
}
