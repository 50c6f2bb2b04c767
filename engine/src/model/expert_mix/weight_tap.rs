//! The ops that put expert weights into the autograd graph upstream of the mix, without copying
//! them (see the parent module's docs).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Weight gradients left by the mix's backward for the taps, one slot per weight.
pub(super) type GradSlots = Arc<Mutex<Vec<Option<Tensor>>>>;

/// Puts one or two expert weights into the graph upstream of the mix (see the module docs):
/// forward passes a one-value carrier on, backward hands the weights their gradients from the
/// mix's slots `first` and `first + 1`.
pub(super) struct WeightTap {
    pub(super) grads: GradSlots,
    pub(super) first: usize,
}

impl WeightTap {
    fn carrier() -> (CpuStorage, Shape) {
        (CpuStorage::F32(vec![0.0]), Shape::from(1))
    }

    fn take(&self, offset: usize) -> Result<Option<Tensor>> {
        let mut slots =
            self.grads.lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        match slots.get_mut(self.first + offset).and_then(Option::take) {
            Some(grad) => Ok(Some(grad)),
            None => candle_core::bail!("moe-weight-tap: no gradient left by the expert mix"),
        }
    }
}

impl CustomOp2 for WeightTap {
    fn name(&self) -> &'static str {
        "moe-weight-tap"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok(Self::carrier())
    }

    fn bwd(
        &self,
        carrier: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(carrier.zeros_like()?), self.take(0)?))
    }
}

impl CustomOp3 for WeightTap {
    fn name(&self) -> &'static str {
        "moe-weight-tap"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok(Self::carrier())
    }

    fn bwd(
        &self,
        carrier: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(carrier.zeros_like()?), self.take(0)?, self.take(1)?))
    }
}
