//! The processor as a library on port 0 against a real redis-server: its lifecycle as seen
//! from `/readyz` and `/metrics`.

mod lifecycle;
