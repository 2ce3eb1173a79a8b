//! PNG sample grids.
