class Buffer: pass
class EventOverlap: pass
