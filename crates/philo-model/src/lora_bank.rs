//! Several LoRA adapters served at once over one base model: each sequence of a batch names
//! its adapter (or none), and each linear layer adds x·Aᵀ·Bᵀ·scale to the rows of the
//! sequences that use that adapter.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::adapter::Adapter;
use crate::error::Result;
use crate::lora_linear::matmul_t;
use crate::phi3::Phi3;

/// A and scale·B of one (layer, module), in the model's dtype and on its device.
#[derive(Debug, Clone)]
struct BankedLora {
    a: Tensor,
    scaled_b: Tensor,
}

/// Adapters by slot number; a slot is stable for as long as its adapter is loaded.
#[derive(Debug, Default)]
pub struct LoraBank {
    slots: Vec<Option<HashMap<(usize, &'static str), BankedLora>>>,
}

impl LoraBank {
    pub fn new() -> Self {
        LoraBank::default()
    }

    /// Checks `adapter` against `model`, moves it to the model's device and returns its slot.
    pub fn insert(&mut self, adapter: &Adapter, model: &Phi3) -> Result<usize> {
        let mut banked = HashMap::new();
        for (key, lora) in adapter.loras(model)? {
            let scaled_b = (&lora.b * lora.scale)?;
            banked.insert(
                key,
                BankedLora {
                    a: lora.a,
                    scaled_b,
                },
            );
        }
        // A fresh slot every time, never an emptied one: callers key cached work by slot (the
        // serving engine's prefix cache does), and a reused number would hand another
        // adapter's keys and values to the new one.
        self.slots.push(Some(banked));
        Ok(self.slots.len() - 1)
    }

    /// The adapter attached to `model`'s layers (`Adapter::attach`) as a new slot, or None
    /// where none is attached.
    pub fn insert_attached(&mut self, model: &Phi3) -> Result<Option<usize>> {
        let mut banked = HashMap::new();
        for (layer, module, linear) in model.linears() {
            if let Some(lora) = &linear.lora {
                let scaled_b = (&lora.b * lora.scale)?;
                let a = lora.a.clone();
                banked.insert((layer, module), BankedLora { a, scaled_b });
            }
        }
        if banked.is_empty() {
            return Ok(None);
        }
        self.slots.push(Some(banked));
        Ok(Some(self.slots.len() - 1))
    }

    /// Unloads the adapter of `slot` (a no-op for an empty slot).
    pub fn remove(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = None;
        }
    }

    /// The adapter delta x·Aᵀ·(scale·B)ᵀ of `slot` at (layer, module) for `x` `[rows, in]`, or
    /// None when that adapter does not target this layer.
    pub(crate) fn delta(
        &self,
        slot: usize,
        layer: usize,
        module: &'static str,
        x: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some(lora) = self
            .slots
            .get(slot)
            .and_then(Option::as_ref)
            .and_then(|m| m.get(&(layer, module)))
        else {
            return Ok(None);
        };
        Ok(Some(matmul_t(&matmul_t(x, &lora.a)?, &lora.scaled_b)?))
    }

    /// A and scale·B of `slot` at (layer, module), where that adapter targets it.
    pub fn weights(
        &self,
        slot: usize,
        layer: usize,
        module: &'static str,
    ) -> Option<(&Tensor, &Tensor)> {
        let lora = self.slots.get(slot)?.as_ref()?.get(&(layer, module))?;
        Some((&lora.a, &lora.scaled_b))
    }

    /// The slots that hold an adapter, in order.
    pub fn loaded(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.slots.len()).filter(|&s| self.contains(s))
    }

    /// Whether `slot` holds an adapter.
    pub fn contains(&self, slot: usize) -> bool {
        matches!(self.slots.get(slot), Some(Some(_)))
    }
}
