//! A dense row-major `N`-dimensional array of `f64`, for pycocotools'
//! `precision [T, R, K, A, M]` and `recall [T, K, A, M]`.

#[derive(Debug, Clone, PartialEq)]
pub struct Grid<const N: usize> {
    pub shape: [usize; N],
    /// Row-major values, `shape.iter().product()` of them.
    pub values: Vec<f64>,
}

impl<const N: usize> Grid<N> {
    /// A grid of `shape` with every value `fill`.
    pub fn filled(shape: [usize; N], fill: f64) -> Self {
        Self { shape, values: vec![fill; shape.iter().product()] }
    }

    /// Flat offset of `index`; panics when an index is out of range (a bug).
    pub fn offset(&self, index: [usize; N]) -> usize {
        index.iter().zip(&self.shape).fold(0, |acc, (&i, &n)| {
            assert!(i < n, "index {index:?} out of shape {:?}", self.shape);
            acc * n + i
        })
    }

    pub fn get(&self, index: [usize; N]) -> f64 {
        self.values[self.offset(index)]
    }

    pub fn set(&mut self, index: [usize; N], value: f64) {
        let at = self.offset(index);
        self.values[at] = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_offsets() {
        let mut g = Grid::filled([2, 3, 4], -1.0);
        assert_eq!(g.offset([1, 2, 3]), 23);
        g.set([1, 0, 2], 5.0);
        assert_eq!(g.values[14], 5.0);
        assert_eq!(g.get([1, 0, 2]), 5.0);
    }
}
