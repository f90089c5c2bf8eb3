// The default constructors of std::stringstream and std::ostringstream, defined inside each module (hidden)
// so that the modules load with the libstdc++ of RHEL 8 and other glibc 2.28 systems, where torch's wheels run.
//
// libstdc++ 9 made these default constructors functions of their own, exported from libstdc++.so under the
// version GLIBCXX_3.4.26; torch's headers (STD_TORCH_CHECK) and ours construct streams with them, so a module
// built with GCC >= 9 would need libstdc++ >= 9 at run time. Every libstdc++ since 5 exports the constructors
// taking an openmode (GLIBCXX_3.4.21), and the default constructors are exactly those with the default mode, so
// each definition below constructs the stream that way. References in the other object files bind to these
// definitions when the module is linked. This is what GCC Toolset's libstdc++_nonshared.a does for manylinux
// builds, for the two symbols the modules use.
#include <new>
#include <sstream>

#if defined(__GLIBCXX__) && defined(_GLIBCXX_RELEASE) && _GLIBCXX_RELEASE >= 9 && _GLIBCXX_USE_CXX11_ABI

extern "C" {

// std::__cxx11::basic_stringstream<char>::basic_stringstream()
__attribute__((visibility("hidden"))) void _ZNSt7__cxx1118basic_stringstreamIcSt11char_traitsIcESaIcEEC1Ev(
    std::stringstream* self) {
  new (self) std::stringstream(std::ios_base::in | std::ios_base::out);
}

// std::__cxx11::basic_ostringstream<char>::basic_ostringstream()
__attribute__((visibility("hidden"))) void _ZNSt7__cxx1119basic_ostringstreamIcSt11char_traitsIcESaIcEEC1Ev(
    std::ostringstream* self) {
  new (self) std::ostringstream(std::ios_base::out);
}

}  // extern "C"

#endif
