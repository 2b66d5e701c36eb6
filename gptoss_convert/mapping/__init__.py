"""The mapping vocabulary shared by backends and converters: rules, transforms, layouts, leaf specs."""
