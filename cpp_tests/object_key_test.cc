// placeholder, filled by the component owner
#include <gtest/gtest.h>
